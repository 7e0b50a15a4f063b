"""Print the resolved versions of torch and every peer the tests compare against (one line)."""
import importlib.metadata as md

NAMES = ["python", "torch", "triton", "numpy", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "kernels",
         "safetensors", "tokenizers", "huggingface-hub", "sentence-transformers", "bm25s", "scipy", "matplotlib",
         "pytest"]


def version(name: str) -> str:
    if name == "python":
        import platform
        return platform.python_version()
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"


print("resolved: " + ", ".join(f"{n} {version(n)}" for n in NAMES))
