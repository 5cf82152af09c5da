/*
 * What the demo needs from the hardware: a console, a counter, a way to stop. Two implementations:
 * platform_qemu.c (emulated RV32EC: QEMU virt, exact instruction counts) and platform_ch32fun.c
 * (CH32V003 / CH32V002 with the ch32fun SDK: SysTick cycles, debug printf).
 */
#ifndef PLATFORM_H
#define PLATFORM_H

#include <stdint.h>

void platform_init(void);
void platform_putc(char c);
/* A free-running counter: retired instructions on QEMU (-icount), core clock cycles on the chip. */
uint32_t platform_counter(void);
/* Name of what platform_counter() counts, for the report. */
extern const char platform_counter_name[];
void platform_exit(int status);

#endif
