/*
 * CPU-bound workload for bench/overhead.py.
 *
 *   gcc -O2 -fno-omit-frame-pointer -pthread -o workload workload.c
 *   ./workload [--threads N] [--duration SECONDS]
 *
 * Starts N worker threads (default: number of online CPUs). Each runs the same
 * fixed amount of work per iteration (an integer mixing loop reached through a
 * chain of non-inlined calls plus a short recursion, so sampled stacks are about
 * ten frames deep) until the main thread raises the stop flag after SECONDS.
 * Prints one line:
 *
 *   iterations=<total> elapsed=<seconds> threads=<N> rate=<iterations per second>
 *
 * The work per iteration never varies, so the rate is the throughput figure.
 */
#include "harness.h"

/* noipa: keep every call a real call (no inlining, cloning or tail-recursion elimination). */
#define NOINLINE __attribute__((noinline, noipa))
#define MIX_ROUNDS 48
#define RECURSION_DEPTH 4


/* Leaf: a fixed number of multiply/xor-shift rounds (splitmix/LCG style). */
NOINLINE static uint64_t mix_leaf(uint64_t x)
{
    for (int i = 0; i < MIX_ROUNDS; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        x ^= x >> 29;
        x *= 0xbf58476d1ce4e5b9ULL;
        x ^= x >> 32;
    }
    return x;
}

/* Short non-tail recursion to make the stacks a little deeper. */
NOINLINE static uint64_t descend(uint64_t x, int depth)
{
    if (depth == 0)
        return mix_leaf(x);
    uint64_t r = descend(x ^ (uint64_t)depth, depth - 1);
    return (r ^ (r >> 17)) + (x >> 7);
}

NOINLINE static uint64_t stage_c(uint64_t x) { return descend(x, RECURSION_DEPTH) ^ 0x9e3779b97f4a7c15ULL; }
NOINLINE static uint64_t stage_b(uint64_t x) { return stage_c(x + 0x632be59bd9b4e019ULL) * 3; }
NOINLINE static uint64_t stage_a(uint64_t x) { return stage_b(x ^ (x << 13)) + 1; }

NOINLINE static void *worker_main(void *arg)
{
    struct worker *w = arg;
    uint64_t x = w->seed, n = 0;
    while (!atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
        x = stage_a(x);
        n++;
    }
    w->count = n;
    w->sink = x;
    return NULL;
}

static uint64_t seed_of(long i)
{
    return 0x243f6a8885a308d3ULL + (uint64_t)i;
}

int main(int argc, char **argv)
{
    struct run run;
    if (run_workers(argc, argv, 20.0, worker_main, seed_of, &run))
        return 1;
    printf("iterations=%llu elapsed=%.6f threads=%ld rate=%.3f sink=%llx\n",
           (unsigned long long)run.total, run.elapsed, run.threads,
           (double)run.total / run.elapsed, (unsigned long long)run.sink);
    return 0;
}
