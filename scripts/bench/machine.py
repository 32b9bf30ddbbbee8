"""One line naming the machine a benchmark ran on: CPU model, its widest vector extensions, core count and the
library versions, so that a figure can be put in the README with the machine it belongs to."""

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def vector_extensions() -> str:
    """The x86 SIMD extensions that change float32 kernels (and their rounding): AVX2, AVX-512, AMX."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    names = [("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"), ("amx_tile", "AMX")]
    return ", ".join(label for flag, label in names if flag in flags) or "none of AVX2/AVX-512"


def describe(*modules) -> str:
    """'<CPU model> (<extensions>), <n> cores; python <v>[, <module> <v> ...]'."""
    versions = "".join(f", {m.__name__} {m.__version__}" for m in modules)
    cpu = f"{cpu_model()} ({vector_extensions()}), {os.cpu_count()} cores"
    return f"{cpu}; python {platform.python_version()}{versions}"


if __name__ == "__main__":
    import jax
    import numpy

    print(describe(jax, numpy))
