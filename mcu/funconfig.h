/* ch32fun configuration of the BitNetMCU demo. */
#ifndef _FUNCONFIG_H
#define _FUNCONFIG_H

#define FUNCONF_USE_DEBUGPRINTF 1  /* printf over SWIO, read with `minichlink -T` */
#define FUNCONF_SYSTICK_USE_HCLK 1

#endif
