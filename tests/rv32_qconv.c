/* One call of BitNetMCU_qconv3x3_FP130 on an emulated RV32EC core, for tests/test_rv32_kernels.py: the arguments
 * come from a block at the start of RAM, the result goes back into it, then the core spins at `done`. */
#include <stdint.h>

#include "BitNetMCU_inference.h"

struct call {
    uint32_t input, offset, size, weights, shift, output, extent, fill, pool, result;
};

void run(void);
void run(void)
{
    volatile struct call *c = (volatile struct call *)0x20000000u;
    c->result = BitNetMCU_qconv3x3_FP130((const uint8_t *)(uintptr_t)c->input, (int32_t)c->offset, c->size,
                                         (const void *)(uintptr_t)c->weights, c->shift,
                                         (uint8_t *)(uintptr_t)c->output, (const uint8_t *)(uintptr_t)c->extent,
                                         c->fill, c->pool);
}

__asm__(".section .text.start, \"ax\", @progbits\n"
        ".globl _start\n"
        "_start:\n"
        "    li sp, 0x20010000\n"
        "    call run\n"
        ".globl done\n"
        "done:\n"
        "    j done\n");
