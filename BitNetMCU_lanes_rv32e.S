/*
 * The FP130 lane convolution in RV32E assembly (BitNetMCU_inference.c calls it; see conv_fp130_lanes there).
 * Assemble it with BitNetMCU_inference.c on 32-bit RISC-V; elsewhere (or with BITNETMCU_NO_ASM) it is empty and
 * the engine's C does the same.
 *
 * For the planes of the 16x16 models (16, 14 and 6 wide: the plane size is in the load offsets of a lane loop, one
 * per size). Compiled C keeps at most 12 values in registers, and the lane loop needs 13: p, acc, the sum, the loaded
 * pixel and the nine shift amounts; so between rows the convolution's state lives in its stack frame, where the lane
 * loops find it too. Only the assembly uses tp, which no bare-metal code (interrupt handlers included) uses; it is
 * saved with ra, s0 and s1. The frame, by offset:
 *     0 s0, s1, ra, tp   16 end of p   20 the lane loop's return   24 c   28 input row   32 output row
 *    36 extent (0: none)   40 rows left   44 the lane loop   48, 52 the input and output rows' steps   56 lo
 *    60 hi (without pooling: the output row + hi)   64 the lane sums of row y   120 of row y + 1
 *   176 the first input of a second row (0: none)
 * A lane loop (a0 = p, a1 = c, a2 = the lane sums, a3 = n > 0) writes the n lane sums of one row and leaves a2 past
 * them; with a second row (pooling, so n is even) it goes on with the same columns there, into the lane sums of row
 * y + 1 (one call per pair of rows, the nine shift amounts loaded once). It keeps only sp and the frame. Unrolled by
 * two, entered in its second half when n is odd: 29 instructions an output. Without pooling the plane holds the fill
 * already (or every output is computed).
 *
 *     void bitnetmcu_fp130_lanes(const uint8_t *input, const struct lanes *c, uint8_t *output,
 *                                const uint8_t *extent, uint32_t pool, lane_loop_fn *loop);
 *
 * c is read by the field offsets of BitNetMCU_lanes.h (LANES_*), which BitNetMCU_inference.c checks against
 * struct lanes when it compiles.
 */
#include "BitNetMCU_lanes.h"

#if defined(__riscv) && __riscv_xlen == 32 && !defined(BITNETMCU_NO_ASM)

.macro BITNETMCU_LANE_SUM size, at   /* a4 = the lane sum of the output at p + at */
    lbu a4, \at(a0)
    sll a4, a4, t0
    lbu a5, \at+1(a0)
    sll a5, a5, t1
    add a4, a4, a5
    lbu a5, \at+2(a0)
    sll a5, a5, t2
    add a4, a4, a5
    lbu a5, \at+\size(a0)
    sll a5, a5, s0
    add a4, a4, a5
    lbu a5, \at+\size+1(a0)
    sll a5, a5, s1
    add a4, a4, a5
    lbu a5, \at+\size+2(a0)
    sll a5, a5, ra
    add a4, a4, a5
    lbu a5, \at+2*\size(a0)
    sll a5, a5, tp
    add a4, a4, a5
    lbu a5, \at+2*\size+1(a0)
    sll a5, a5, a3
    add a4, a4, a5
    lbu a5, \at+2*\size+2(a0)
    sll a5, a5, a1
    add a4, a4, a5
.endm
.macro BITNETMCU_LANE_LOOP name, size
    .pushsection .text.\name, "ax", @progbits
    .globl \name
    .type \name, @function
    .p2align 1
\name:
    sw ra, 20(sp)
    add a5, a0, a3
    sw a5, 16(sp)   /* the end of p */
    andi a5, a3, 1
    lw t0, LANES_R(a1)
    lw t1, LANES_R + 4(a1)
    lw t2, LANES_R + 8(a1)
    lw s0, LANES_R + 12(a1)
    lw s1, LANES_R + 16(a1)
    lw ra, LANES_R + 20(a1)
    lw tp, LANES_R + 24(a1)
    lw a3, LANES_R + 28(a1)
    lw a1, LANES_R + 32(a1)
    beqz a5, 1f
    addi a0, a0, -1   /* odd n: the first output is the second half's */
    addi a2, a2, -4
    j 2f
1:
    BITNETMCU_LANE_SUM \size, 0
    sw a4, 0(a2)
2:
    BITNETMCU_LANE_SUM \size, 1
    sw a4, 4(a2)
    addi a0, a0, 2
    addi a2, a2, 8
    lw a5, 16(sp)
    bne a0, a5, 1b
    lw a4, 176(sp)   /* the second row's first input, or 0 */
    bnez a4, 3f
    lw ra, 20(sp)
    ret
3:   /* the same columns of the next row, into the second row of sums */
    sw zero, 176(sp)
    mv a0, a4
    addi a5, a5, \size
    sw a5, 16(sp)
    addi a2, sp, 120
    j 1b
    .size \name, . - \name
    .popsection
.endm
    BITNETMCU_LANE_LOOP bitnetmcu_lane_loop16, 16
    BITNETMCU_LANE_LOOP bitnetmcu_lane_loop14, 14
    BITNETMCU_LANE_LOOP bitnetmcu_lane_loop6, 6
/* The requantized lane value of a5 (its lanes already subtracted): a4 = clamp((a5 + bias) >> shift, 0, 127). */
.macro BITNETMCU_REQUANTIZE
    add a5, a5, t2
    sra a4, a5, t1
    bgeu s1, a4, 9f
    srai a4, a5, 31   /* out of range: 0 below, 127 above */
    not a4, a4
    andi a4, a4, 127
9:
.endm
/* a5 = the lane value of the lane sum at `at`(a2): low lane minus high lane (clobbers a4). */
.macro BITNETMCU_LANE_VALUE at
    lw a4, \at(a2)
    and a5, a4, s0
    srl a4, a4, t0
    sub a5, a5, a4
.endm
/* The lane sums of the row at the input row, columns [lo, hi) = [t1, t2), into the first row of lane sums. */
.macro BITNETMCU_FIRST_ROW
    lw a0, 28(sp)
    add a0, a0, t1
    sub a3, t2, t1
    lw a1, 24(sp)
    addi a2, sp, 64
    lw a5, 44(sp)
    jalr a5
.endm
/* The next output row (with pooling: pair of input rows), back to `loop` while rows are left. */
.macro BITNETMCU_NEXT loop
    lw a0, 28(sp)
    lw a5, 48(sp)
    add a0, a0, a5
    sw a0, 28(sp)
    lw a2, 32(sp)
    lw a5, 52(sp)
    add a2, a2, a5
    sw a2, 32(sp)
    lw t0, 40(sp)
    addi t0, t0, -1
    sw t0, 40(sp)
    bnez t0, \loop
.endm
/* After a row's lane loops: t0 lane, t1 shift, t2 bias, s0 mask, s1 127. */
.macro BITNETMCU_REQUANTIZE_CONSTANTS
    lw a1, 24(sp)
    lw t0, LANES_LANE(a1)
    lw t1, LANES_SHIFT(a1)
    lw t2, LANES_BIAS(a1)
    lw s0, LANES_MASK(a1)
    li s1, 127
.endm
    .pushsection .text.bitnetmcu_fp130_lanes, "ax", @progbits
    .globl bitnetmcu_fp130_lanes
    .type bitnetmcu_fp130_lanes, @function
    .p2align 1
bitnetmcu_fp130_lanes:
    addi sp, sp, -180
    sw s0, 0(sp)
    sw s1, 4(sp)
    sw ra, 8(sp)
    sw tp, 12(sp)
    sw zero, 176(sp)
    sw a1, 24(sp)
    sw a0, 28(sp)
    sw a2, 32(sp)
    sw a3, 36(sp)
    sw a5, 44(sp)
    lw t0, LANES_SIZE(a1)   /* size */
    addi t1, t0, -2   /* the output rows and columns */
    bnez a4, .Lbitnetmcu_pool
    sw t0, 48(sp)
    sw t1, 52(sp)
    sw t1, 40(sp)
.Lbitnetmcu_row:   /* one output row: its columns [lo, hi) in t1, t2 */
    lw a3, 36(sp)
    li t1, 0
    lw t2, 52(sp)
    beqz a3, 1f
    lbu t1, 0(a3)
    lbu t2, 1(a3)
    addi a3, a3, 2
    sw a3, 36(sp)
    bgeu t1, t2, .Lbitnetmcu_next_row   /* nothing to compute: the plane holds the fill */
1:
    lw a5, 32(sp)
    add a5, a5, t2
    sw a5, 60(sp)   /* the output row + hi */
    BITNETMCU_FIRST_ROW   /* leaves a2 past the last lane sum */
    BITNETMCU_REQUANTIZE_CONSTANTS
    lw a0, 60(sp)
    addi a3, sp, 64   /* backwards, from the last output, by twos */
    sub a5, a2, a3
    andi a5, a5, 4
    beqz a5, 2f
    addi a2, a2, -4   /* odd n: the last output alone */
    BITNETMCU_LANE_VALUE 0
    BITNETMCU_REQUANTIZE
    addi a0, a0, -1
    sb a4, 0(a0)
    beq a2, a3, .Lbitnetmcu_next_row
2:
    addi a2, a2, -8
    BITNETMCU_LANE_VALUE 4
    BITNETMCU_REQUANTIZE
    sb a4, -1(a0)
    BITNETMCU_LANE_VALUE 0
    BITNETMCU_REQUANTIZE
    addi a0, a0, -2
    sb a4, 0(a0)
    bne a2, a3, 2b
.Lbitnetmcu_next_row:
    BITNETMCU_NEXT .Lbitnetmcu_row
    j .Lbitnetmcu_return
.Lbitnetmcu_pool:   /* 2x2 max pooling: two rows of lane sums per output row */
    add t0, t0, t0
    srli t1, t1, 1
    sw t0, 48(sp)
    sw t1, 52(sp)
    sw t1, 40(sp)
.Lbitnetmcu_pair:   /* the union of the rows' extents, to whole pairs of columns */
    lw a3, 36(sp)
    li t1, 0
    lw t2, 52(sp)
    add t2, t2, t2
    beqz a3, 5f
    lbu t1, 0(a3)
    lbu t2, 1(a3)
    lbu a4, 2(a3)
    lbu a5, 3(a3)
    addi a3, a3, 4
    sw a3, 36(sp)
    bltu t1, t2, 1f
    mv t1, a4   /* row y is empty: row y + 1's */
    mv t2, a5
    j 3f
1:
    bgeu a4, a5, 3f   /* row y + 1 is empty: row y's */
    bgeu a4, t1, 2f
    mv t1, a4
2:
    bgeu t2, a5, 3f
    mv t2, a5
3:
    bltu t1, t2, 4f
    li t1, 0   /* nothing to compute */
    li t2, 0
    j .Lbitnetmcu_fills
4:
    andi t1, t1, -2
    addi t2, t2, 1
    andi t2, t2, -2
5:
    sw t1, 56(sp)
    sw t2, 60(sp)
    lw a0, 28(sp)
    add a0, a0, t1
    lw a1, 24(sp)
    lw a5, LANES_SIZE(a1)
    add a5, a0, a5
    sw a5, 176(sp)   /* row y + 1 in the same call */
    sub a3, t2, t1
    addi a2, sp, 64
    lw a5, 44(sp)
    jalr a5
    BITNETMCU_REQUANTIZE_CONSTANTS
    addi a2, sp, 64
    lw a0, 32(sp)
    lw a3, 60(sp)
    srli a3, a3, 1
    add a3, a0, a3   /* the output row + hi / 2 */
    lw a5, 56(sp)
    srli a5, a5, 1
    add a0, a0, a5   /* the output row + lo / 2 */
6:   /* the requantized maximum of four lane values */
    BITNETMCU_LANE_VALUE 0
    mv a1, a5
    BITNETMCU_LANE_VALUE 4
    bge a1, a5, 7f
    mv a1, a5
7:
    BITNETMCU_LANE_VALUE 56
    bge a1, a5, 7f
    mv a1, a5
7:
    BITNETMCU_LANE_VALUE 60
    bge a5, a1, 7f
    mv a5, a1
7:
    BITNETMCU_REQUANTIZE
    sb a4, 0(a0)
    addi a2, a2, 8
    addi a0, a0, 1
    bne a0, a3, 6b
    lw t1, 56(sp)
    lw t2, 60(sp)
.Lbitnetmcu_fills:   /* the fill outside the output columns [lo / 2, hi / 2) */
    lw a1, 24(sp)
    lbu a4, LANES_FILL(a1)
    lw a0, 32(sp)
    lw a3, 52(sp)
    add a3, a0, a3
    srli t1, t1, 1
    add a1, a0, t1
    srli t2, t2, 1
    add a2, a0, t2
    beq a0, a1, 2f
1:
    sb a4, 0(a0)
    addi a0, a0, 1
    bne a0, a1, 1b
2:
    beq a2, a3, 4f
3:
    sb a4, 0(a2)
    addi a2, a2, 1
    bne a2, a3, 3b
4:
    BITNETMCU_NEXT .Lbitnetmcu_pair
.Lbitnetmcu_return:
    lw s0, 0(sp)
    lw s1, 4(sp)
    lw ra, 8(sp)
    lw tp, 12(sp)
    addi sp, sp, 180
    ret
    .size bitnetmcu_fp130_lanes, . - bitnetmcu_fp130_lanes
    .popsection

#endif

#if defined(__linux__) && defined(__ELF__)
    .section .note.GNU-stack, "", %progbits   /* a host build: no executable stack */
#endif
