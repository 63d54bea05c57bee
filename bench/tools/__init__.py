"""Profiling and diagnostic tools, apart from the benchmarks (each ``python -m bench.tools.<name> --help``):

* ``ncu``: Nsight Compute runs of the chunked scan, its source-page summary and roofline table;
* ``offline_kernels``: the Triton kernels compiled for a GPU on a machine without one (registers, layouts);
* ``memcheck``: one forward+backward of each kernel, for ``compute-sanitizer`` (``bash bench/gpu.sh memcheck``);
* ``memcheck_revkern``: each CUDA path of the reversible extension's ops once, likewise;
* ``host_probe``: the host (CPU) cost of each layer of the head-dim-1 scan call;
* ``kernel_times``: per-kernel device times of one forward+backward (the benchmarks' ``--profile``);
* ``memory_peak``: what is live at the allocator's peak of one step (``python -m bench reversible --peak``).
"""
