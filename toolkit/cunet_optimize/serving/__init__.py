"""Serving what `build` makes: Triton model repositories and DeepStream nvinfer configs written
beside each engine (deploy.py), their validation (validate.py), and a real Triton server for CPU
builds (server.py, in its own environment: server_env.py). Below commands/, above engines/."""
