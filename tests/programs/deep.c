/* A deep stack: main -> recurse x DEPTH -> deep_leaf.
 * Usage: deep SECONDS DEPTH [wide]
 * With `wide`, main -> recurse_wide x DEPTH -> deep_leaf, whose frames are each
 * WIDE_FRAME_BYTES apart: more than the eBPF walk reads from the stack at once. */
#include <stdint.h>
#include <stdlib.h>

#include "programs.h"

static double end;

NOINLINE uint64_t deep_leaf(uint64_t x)
{
    while (now() < end)
        for (int i = 0; i < 100000; i++)
            x = x * 6364136223846793005ULL + 1;
    return x;
}

NOINLINE uint64_t recurse(int depth, uint64_t x)
{
    if (depth == 0)
        return deep_leaf(x);
    return recurse(depth - 1, x + 1) + 1;
}

#define WIDE_FRAME_BYTES 1536

NOINLINE uint64_t recurse_wide(int depth, uint64_t x)
{
    volatile char pad[WIDE_FRAME_BYTES];
    pad[0] = (char)x;
    pad[WIDE_FRAME_BYTES - 1] = (char)depth;
    if (depth == 0)
        return deep_leaf(x) + pad[0];
    return recurse_wide(depth - 1, x + 1) + pad[WIDE_FRAME_BYTES - 1];
}

int main(int argc, char **argv)
{
    end = now() + (argc > 1 ? atof(argv[1]) : 5);
    int depth = argc > 2 ? atoi(argv[2]) : 50;
    if (argc > 3 && argv[3][0] == 'w')
        return recurse_wide(depth, 1) == 0;
    return recurse(depth, 1) == 0;
}
