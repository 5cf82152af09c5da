/*
 * CH32V003 / CH32V002 with the ch32fun SDK: console over the single-wire debug interface
 * (minichlink -T shows it), SysTick counting core clock cycles (HCLK, 48 MHz).
 */
#include <stdio.h>

#include "ch32fun.h"
#include "platform.h"

const char platform_counter_name[] = "cycles";

void platform_init(void)
{
    SystemInit();
    SysTick->CTLR = SYSTICK_CTLR_STE | SYSTICK_CTLR_STCLK; /* free-running, HCLK */
}

void platform_putc(char c)
{
    putchar(c);
}

uint32_t platform_counter(void)
{
    return SysTick->CNT;
}

void platform_exit(int status)
{
    (void)status; /* a chip has nowhere to return to: the report stays on the console */
    for (;;) {
    }
}
