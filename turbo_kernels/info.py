"""`python -m turbo_kernels.info`: which backend of every op is usable here, and why not."""

from turbo_kernels import backend_report

if __name__ == "__main__":
    print(backend_report())
