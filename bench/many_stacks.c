/*
 * CPU-bound workload with many distinct call stacks, for bench/agent_outage.py.
 *
 *   gcc -O1 -fno-omit-frame-pointer -pthread -o many_stacks many_stacks.c
 *   ./many_stacks [--threads N] [--duration SECONDS]
 *
 * Starts N worker threads (default: number of online CPUs). Each repeatedly walks
 * a pseudo-random path through 64 distinct non-inlined functions (f00 .. f77,
 * named by two octal digits), 6 to 12 calls deep, choosing the next function
 * from its own xorshift state.
 * There are 64^6 .. 64^12 possible paths, so nearly every sample lands on a stack
 * never seen before: at 97 Hz on 2 busy CPUs a 15 s interval holds ~2 900
 * samples and about as many distinct stacks (the worst case for a profile's
 * stack table and for bytes on the wire per sample).
 *
 * Frame pointers: GCC does not give leaf functions a frame at -O1 and above, so
 * a sample in a leaf hides the leaf's caller. Here every f?? always makes a call
 * first (to the next f?? or, at the end of the path, to a tiny leaf) and does its
 * work after that call returns, so the work always runs inside a function that
 * has set up its frame, and every frame of the path is visible. -O1 does not
 * turn calls into jumps (-foptimize-sibling-calls is -O2), and the work after
 * the call means no call is a tail call anyway.
 *
 * Prints one line at the end:
 *
 *   paths=<total> elapsed=<seconds> threads=<N>
 */
#include "harness.h"

/* noipa: keep every call a real call (no inlining, cloning or IPA shortcuts). */
#define NOINLINE __attribute__((noinline, noipa))
#define NFUNCS 64
/* Path depths: -DMIN_DEPTH=.. -DMAX_DEPTH=.. make deeper stacks (bench/stack_bound.py). */
#ifndef MIN_DEPTH
#define MIN_DEPTH 6
#endif
#ifndef MAX_DEPTH
#define MAX_DEPTH 12
#endif
/* Work per frame: a few hundred ns, so a path takes a few us and consecutive
 * samples (10 ms apart) land on unrelated paths. */
#define ROUNDS 64

typedef uint64_t (*step_fn)(uint64_t x, int depth);

/* Filled in after the functions are defined (a tentative definition). */
static step_fn steps[NFUNCS];


static inline uint64_t xorshift(uint64_t x)
{
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
}

/* The end of every path: a tiny leaf, cheap so that it is rarely sampled. */
NOINLINE static uint64_t path_end(uint64_t x)
{
    return x ^ (x >> 31);
}

/*
 * Function number N: call the next function of the path (chosen by the state),
 * or the leaf at the end of the path, then do ROUNDS of mixing in this frame.
 * Each function mixes with its own constant so the compiler cannot merge them.
 */
#define STEP(N)                                                                   \
    NOINLINE static uint64_t f##N(uint64_t x, int depth)                         \
    {                                                                             \
        uint64_t next = xorshift(x + (uint64_t)(N) * 0x9e3779b97f4a7c15ULL);    \
        uint64_t r;                                                               \
        if (depth > 0)                                                            \
            r = steps[next % NFUNCS](next, depth - 1);                            \
        else                                                                      \
            r = path_end(next);                                                   \
        for (int i = 0; i < ROUNDS; i++) {                                        \
            r = r * 6364136223846793005ULL + (1442695040888963407ULL + (N));     \
            r ^= r >> 29;                                                         \
        }                                                                         \
        return r ^ x;                                                             \
    }

#define STEP8(A) STEP(A##0) STEP(A##1) STEP(A##2) STEP(A##3) \
                 STEP(A##4) STEP(A##5) STEP(A##6) STEP(A##7)
STEP8(0) STEP8(1) STEP8(2) STEP8(3) STEP8(4) STEP8(5) STEP8(6) STEP8(7)

#define REF8(A) f##A##0, f##A##1, f##A##2, f##A##3, f##A##4, f##A##5, f##A##6, f##A##7,
static step_fn steps[NFUNCS] = { REF8(0) REF8(1) REF8(2) REF8(3) REF8(4) REF8(5) REF8(6) REF8(7) };

NOINLINE static uint64_t walk_path(uint64_t x)
{
    x = xorshift(x);
    int depth = MIN_DEPTH + (int)((x >> 40) % (MAX_DEPTH - MIN_DEPTH + 1));
    uint64_t r = steps[x % NFUNCS](x, depth - 1);
    return r + 1;
}

NOINLINE static void *worker_main(void *arg)
{
    struct worker *w = arg;
    uint64_t x = w->seed, n = 0;
    while (!atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
        /* Keep the state from ever reaching 0 (a fixed point of xorshift). */
        x = walk_path(x) | 1;
        n++;
    }
    w->count = n;
    w->sink = x;
    return NULL;
}

static uint64_t seed_of(long i)
{
    return 0x2545f4914f6cdd1dULL * (uint64_t)(i + 1) + (uint64_t)getpid();
}

int main(int argc, char **argv)
{
    struct run run;
    if (run_workers(argc, argv, 60.0, worker_main, seed_of, &run))
        return 1;
    printf("paths=%llu elapsed=%.3f threads=%ld\n", (unsigned long long)run.total, run.elapsed,
           run.threads);
    return 0;
}
