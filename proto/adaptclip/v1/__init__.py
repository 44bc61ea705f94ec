"""adaptclip.v1 API: classifier_pb2 and classifier_pb2_grpc are generated from classifier.proto at install."""
