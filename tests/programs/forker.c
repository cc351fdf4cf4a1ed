/* A parent that forks short-lived children without exec, one after another: each
 * child runs fork_work -> fork_leaf for MS milliseconds and exits, too soon for
 * the profiler to read its mappings (it reads them within ~0.5 s).
 * Usage: forker SECONDS MS */
#include <stdint.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "programs.h"

NOINLINE uint64_t fork_leaf(double until)
{
    return busy_until(until);
}

NOINLINE uint64_t fork_work(double ms)
{
    return fork_leaf(now() + ms / 1000);
}

int main(int argc, char **argv)
{
    double end = now() + (argc > 1 ? atof(argv[1]) : 5);
    double ms = argc > 2 ? atof(argv[2]) : 30;
    while (now() < end) {
        pid_t child = fork();
        if (child == 0)
            _exit(fork_work(ms) == 0);
        if (child < 0)
            return 1;
        waitpid(child, NULL, 0);
    }
    return 0;
}
