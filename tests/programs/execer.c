/* A parent that runs a program with exec, one child after another: each child
 * runs exec_work -> exec_leaf for MS milliseconds and exits, too soon for the
 * profiler to read its /proc entry. The parent execs PROGRAM (its absolute path;
 * give it a copy of this binary, which no other process maps, to leave the
 * profiler only the kernel's view of the child's mappings to name it by).
 * With PRE_MS, each child first runs pre_exec_work -> pre_exec_leaf for PRE_MS
 * milliseconds in the parent's program, between its fork and its exec.
 * Usage: execer SECONDS MS PROGRAM [PRE_MS]   (parent)
 *        execer --child MS                    (child) */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "programs.h"

NOINLINE uint64_t exec_leaf(double until)
{
    return busy_until(until);
}

NOINLINE uint64_t exec_work(double ms)
{
    return exec_leaf(now() + ms / 1000);
}

NOINLINE uint64_t pre_exec_leaf(double until)
{
    return busy_until(until);
}

NOINLINE uint64_t pre_exec_work(double ms)
{
    return pre_exec_leaf(now() + ms / 1000);
}

int main(int argc, char **argv)
{
    if (argc > 2 && strcmp(argv[1], "--child") == 0)
        return exec_work(atof(argv[2])) == 0;
    if (argc < 4)
        return 2;
    double end = now() + atof(argv[1]);
    double pre_ms = argc > 4 ? atof(argv[4]) : 0;
    while (now() < end) {
        pid_t child = fork();
        if (child == 0) {
            if (pre_ms > 0 && pre_exec_work(pre_ms) == 0)
                _exit(126);
            execl(argv[3], argv[3], "--child", argv[2], (char *)NULL);
            _exit(127);
        }
        if (child < 0)
            return 1;
        int status;
        waitpid(child, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) == 127)
            return 1;
    }
    return 0;
}
