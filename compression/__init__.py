"""Model compression: token reduction, data-free quantisation, ONNX export and the torch-free edge runner."""
