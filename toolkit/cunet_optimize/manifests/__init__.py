"""The JSON manifests the toolkit writes and reads back, as typed dataclasses.

- schema:  dataclass <-> dict with every field checked against its type hint; the one
           schema check; one-line errors naming the file and the field
- build:   build.json (BuildManifest), written by `build`, read by `profile` and `qat --plan`
- profile: the profile JSON (ProfileManifest), written by `profile`, read by `report`

Nothing here imports torch, ONNX or NumPy: `cunet-optimize report` reads JSON only.
"""
