"""The orchestration above the stages: `build` (pipeline/build.py) runs the line from a
checkpoint to an engine folder, calling the stage packages (quant/, exporters/, surgery/,
engines/) and never called by them."""
