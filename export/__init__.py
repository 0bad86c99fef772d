"""Export an InstructPix2Pix model to a self-describing ONNX or TensorRT bundle: ``ip2p export``."""
