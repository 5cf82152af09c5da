/*
 * Minimal RV32E start-up: stack, .data copy, .bss clear, paint the stack (for peak-stack measurement),
 * call main, exit with its status. Any trap prints its cause and exits with status 3.
 */
    .option arch, +zicsr        /* csrr/csrw: -march stays plain rv32ec so gcc finds its rv32e libgcc */
    .section .text.start, "ax"
    .globl _start
_start:
    la   sp, __stack_top
    la   t0, trap_entry
    csrw mtvec, t0
    la   a0, __data_load
    la   a1, __data_start
    la   a2, __data_end
1:  bgeu a1, a2, 2f
    lw   t0, 0(a0)
    sw   t0, 0(a1)
    addi a0, a0, 4
    addi a1, a1, 4
    j    1b
2:  la   a1, __bss_start
    la   a2, __bss_end
3:  bgeu a1, a2, 4f
    sw   zero, 0(a1)
    addi a1, a1, 4
    j    3b
4:  call main
    call platform_exit
5:  j    5b

    .align 2
trap_entry:
    la   sp, __stack_top
    csrr a0, mcause
    csrr a1, mepc
    call report_trap
6:  j    6b
