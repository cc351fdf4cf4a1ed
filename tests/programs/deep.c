/* A deep stack: main -> recurse x DEPTH -> deep_leaf.
 * Usage: deep SECONDS DEPTH */
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

int main(int argc, char **argv)
{
    end = now() + (argc > 1 ? atof(argv[1]) : 5);
    int depth = argc > 2 ? atoi(argv[2]) : 50;
    return recurse(depth, 1) == 0;
}
