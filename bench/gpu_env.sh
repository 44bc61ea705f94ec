# Source it, from the project root, on the offline GPU machine (see ../shared/device/README.md):
#
#     source bench/gpu_env.sh
#
# That machine has torch, triton, grpcio, protobuf and pytest but not open_clip, Kornia, the gRPC
# extras or redis-py. This installs the wheels carried in .whl/ (made here by
# `bash ../shared/device/fetch-wheels.sh`) into /tmp/site, puts them on PYTHONPATH, and makes adaptclip
# importable with its generated gRPC code. Sourcing it again (a second GPU check in the same run) finds
# everything in place and does nothing. Returns non-zero, printing why, when it cannot.
if ! python3 -c "import open_clip, kornia, grpc_health, grpc_reflection, grpc_tools, redis" 2>/dev/null; then
  if [ ! -d .whl ]; then
    echo "gpu_env: open_clip / kornia / the gRPC extras are missing and there is no .whl/ here" \
         "(run 'bash ../shared/device/fetch-wheels.sh' on a machine with the package index)" >&2
    return 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_env: installing .whl/ failed" >&2; return 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -c "import adaptclip.kernels, adaptclip.v1.classifier_pb2" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    || { echo "gpu_env: installing adaptclip (pip install -e .) failed" >&2; return 2; }
fi
