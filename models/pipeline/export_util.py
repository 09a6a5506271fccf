"""Post-export checks shared by every model."""
import os

import onnx

MAX_BYTES = 6 * 1024 * 1024


def finalize(path: str) -> int:
    """Validates the graph and rewrites it as one self-contained file (no external data)."""
    model = onnx.load(path, load_external_data=True)
    onnx.checker.check_model(model, full_check=True)
    for f in os.listdir(os.path.dirname(path)):
        if f.endswith(".data") or f.endswith(".onnx_data"):
            os.remove(os.path.join(os.path.dirname(path), f))
    onnx.save_model(model, path, save_as_external_data=False)
    onnx.checker.check_model(path)
    size = os.path.getsize(path)
    if size > MAX_BYTES:
        raise SystemExit(f"{path} is {size} bytes, over the {MAX_BYTES} byte budget")
    return size
