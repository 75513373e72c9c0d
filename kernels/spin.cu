// The known slowdown of a speed sensitivity test (DS4BENCH_SLOWDOWN, ds4bench/engine/slowdown.py): one
// thread waits until `*wait_ns` nanoseconds of the GPU's global timer have passed. The wait is
// read from device memory, so a decode step captured in a CUDA graph replays whatever the host
// set last (0 until the warm-up has timed the step it is a fraction of), and it is wall time,
// independent of the SM clock.
__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

extern "C" __global__ void spin_ns(const long long* __restrict__ wait_ns) {
    const unsigned long long wait = (unsigned long long)wait_ns[0];
    const unsigned long long t0 = global_ns();
    while (global_ns() - t0 < wait) {
    }
}
