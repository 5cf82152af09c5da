/*
 * One channel's FP130 lane convolution set-up (fp130_setup in BitNetMCU_inference.c fills it), shared by the C engine
 * and its RV32E assembly (BitNetMCU_lanes_rv32e.S), which reads it by the byte offsets below. Internal to the engine;
 * BitNetMCU_inference.c checks the offsets against the struct when it compiles.
 */
#ifndef BITNETMCU_LANES_H
#define BITNETMCU_LANES_H

#define LANES_R 0         /* uint32_t r[9] */
#define LANES_SIZE 36
#define LANES_LANE 40
#define LANES_SHIFT 44
#define LANES_BIAS 48
#define LANES_MASK 52
#define LANES_FILL 56

#ifndef __ASSEMBLER__
#include <stdint.h>

struct lanes {
    uint32_t r[9];            /* e - low, or lane + e - low for a negative weight (see fp130_setup) */
    uint32_t size, lane, shift;
    int32_t bias;
    uint32_t mask;            /* the low lane: (1 << lane) - 1 */
    uint32_t fill;            /* every output outside the extent */
};
#endif

#endif
