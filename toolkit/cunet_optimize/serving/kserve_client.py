"""KServe v2 requests through Triton's own client library, run in the server's environment.

tritonclient's gRPC side needs protobuf < 5 and numpy < 2 (2.51), which this toolkit's
environment does not have; so `cunet-optimize serve` runs this file with the server
environment's Python (serving/server_env.py) and exchanges arrays through .npy/.npz files.
It imports nothing of cunet_optimize.

    python kserve_client.py URL PROTOCOL MODEL INPUT_NAME IN.npy OUT.npz OUTPUT_NAME...
"""

import sys

import numpy as np


def infer(url: str, protocol: str, model: str, input_name: str, image: np.ndarray, outputs: list) -> dict:
    if protocol == "grpc":
        import tritonclient.grpc as client
    else:
        import tritonclient.http as client
    with client.InferenceServerClient(url) as server:
        tensor = client.InferInput(input_name, list(image.shape), "FP32")
        if protocol == "grpc":
            tensor.set_data_from_numpy(image)
            requested = [client.InferRequestedOutput(name) for name in outputs]
        else:  # binary tensors both ways, not JSON lists of floats
            tensor.set_data_from_numpy(image, binary_data=True)
            requested = [client.InferRequestedOutput(name, binary_data=True) for name in outputs]
        result = server.infer(model, [tensor], outputs=requested)
        return {name: result.as_numpy(name) for name in outputs}


def main(argv: list) -> int:
    url, protocol, model, input_name, in_path, out_path, *outputs = argv
    got = infer(url, protocol, model, input_name, np.load(in_path), outputs)
    np.savez(out_path, **got)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
