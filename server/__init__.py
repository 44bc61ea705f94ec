"""The adaptclip gRPC server: model hosting, label sets, dynamic batching."""
