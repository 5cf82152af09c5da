/* ch32fun configuration of the BitNetMCU demo. */
#ifndef _FUNCONFIG_H
#define _FUNCONFIG_H

#define FUNCONF_USE_DEBUGPRINTF 1  /* printf over SWIO, read with `minichlink -T` */
#define FUNCONF_SYSTICK_USE_HCLK 1 /* SysTick counts core clock cycles (48 MHz) */
#define FUNCONF_TINYVECTOR 1       /* the demo uses no interrupts: no 156-byte vector table */
#define FUNCONF_DEBUG_HARDFAULT 0  /* no fault printer in flash: make chip-sim names faults */
#define FUNCONF_USE_CLK_SEC 0      /* no clock security system: the HSI does not fail over */

#endif
