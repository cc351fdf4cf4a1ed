/* Loads a two-instruction BPF socket filter (r0 = 0; exit), which the kernel lists
 * in kallsyms as new kernel code, and holds it for SECONDS before exiting.
 * Usage: bpf_loader SECONDS */
#include <linux/bpf.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    struct bpf_insn insns[] = {
        {.code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 0, .imm = 0},
        {.code = BPF_JMP | BPF_EXIT},
    };
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.prog_type = BPF_PROG_TYPE_SOCKET_FILTER;
    attr.insn_cnt = 2;
    attr.insns = (unsigned long)insns;
    attr.license = (unsigned long)"GPL";
    int fd = syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof(attr));
    if (fd < 0) {
        perror("BPF_PROG_LOAD");
        return 1;
    }
    printf("loaded\n");
    fflush(stdout);
    sleep(argc > 1 ? atoi(argv[1]) : 10);
    return 0;
}
