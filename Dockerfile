# adaptclip service image: the same install.sh and lock file as a developer checkout.
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN bash install.sh && rm -rf /root/.cache/pip
EXPOSE 50051
ENTRYPOINT ["/app/.venv/bin/adaptclip", "serve"]
