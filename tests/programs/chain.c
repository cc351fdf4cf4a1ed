/* A known call chain for the profiler's tests:
 *   main -> chain_outer -> chain_middle -> chain_inner -> spin_leaf
 * Built with -fno-omit-frame-pointer so a frame-pointer walk sees every frame.
 * Usage: chain SECONDS   (busy for SECONDS, then exits 0) */
#include <stdint.h>
#include <stdlib.h>

#include "programs.h"

NOINLINE uint64_t spin_leaf(uint64_t x)
{
    for (int i = 0; i < 1000000; i++)
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    return x;
}

NOINLINE uint64_t chain_inner(uint64_t x) { return spin_leaf(x) + 1; }
NOINLINE uint64_t chain_middle(uint64_t x) { return chain_inner(x) + 1; }
NOINLINE uint64_t chain_outer(uint64_t x) { return chain_middle(x) + 1; }

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 5;
    double end = now() + seconds;
    volatile uint64_t sink = 1;
    while (now() < end)
        sink = chain_outer(sink);
    return 0;
}
