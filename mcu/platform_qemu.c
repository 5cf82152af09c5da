/*
 * QEMU `virt` machine: 16550 UART at 0x10000000, SiFive test device at 0x100000 to exit.
 * With -icount shift=0, minstret counts exactly the instructions the core retires.
 */
#include "platform.h"

#define UART_THR (*(volatile uint8_t *)0x10000000u)
#define TEST_DEVICE (*(volatile uint32_t *)0x00100000u)

const char platform_counter_name[] = "instructions";

void platform_init(void)
{
}

void platform_putc(char c)
{
    UART_THR = (uint8_t)c;
}

uint32_t platform_counter(void)
{
    uint32_t n;
    /* Zicsr is named for the assembler only: -march stays plain rv32ec so gcc finds its rv32e libgcc. */
    __asm__ volatile(".option push\n.option arch, +zicsr\ncsrr %0, minstret\n.option pop" : "=r"(n));
    return n;
}

void platform_exit(int status)
{
    /* 0x5555: pass; (code << 16) | 0x3333: fail with exit code `code`. */
    TEST_DEVICE = status == 0 ? 0x5555u : (((uint32_t)status << 16) | 0x3333u);
    for (;;) {
    }
}
