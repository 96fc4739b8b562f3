"""A process that holds GPU memory, as a stuck task would: `python cuda_hog.py MIB`.

It talks to the driver (libcuda) through ctypes, so the real-GPU tests need no CUDA framework.
It prints `ready` once the memory is allocated and holds it until its stdin closes.
"""

from __future__ import annotations

import ctypes
import sys


def main() -> None:
    cuda = ctypes.CDLL("libcuda.so.1")

    def check(code: int, what: str) -> None:
        if code != 0:
            raise SystemExit(f"{what} failed with CUresult {code}")

    check(cuda.cuInit(0), "cuInit")
    device = ctypes.c_int()
    check(cuda.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
    context = ctypes.c_void_p()
    check(cuda.cuCtxCreate_v2(ctypes.byref(context), 0, device), "cuCtxCreate")
    pointer = ctypes.c_uint64()
    check(cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(int(sys.argv[1]) << 20)), "cuMemAlloc")
    print("ready", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
