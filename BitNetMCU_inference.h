/*
 * BitNetMCU inference engine: integer kernels for low-bit quantized networks.
 *
 * C99, no malloc, no float, no state: every kernel works on buffers the caller provides.
 * A generated model header (exportquant.py -> BitNetMCU_model.h) holds the weights and one
 * function, BitNetMCU_model_infer(), that calls these kernels in order.
 *
 * Multiplier-free: with BITNETMCU_NO_MUL defined (automatic on RISC-V cores without a
 * multiplier, e.g. RV32EC on the CH32V003), the Binary, Ternary, 2bitsym, 4bitsym and FP130
 * kernels use only shifts and adds. 4bit, 8bit and NF4 multiply in every build.
 */
#ifndef BITNETMCU_INFERENCE_H
#define BITNETMCU_INFERENCE_H

#include <stdint.h>

#if defined(__riscv) && !defined(__riscv_mul) && !defined(__riscv_zmmul) && !defined(BITNETMCU_NO_MUL)
#define BITNETMCU_NO_MUL 1
#endif

/* Weight encodings. Packed MSB-first into uint32_t words, first input in the topmost bits; every
 * output row starts on a new word. Ternary packs 10 trits per uint16_t instead (see the .c file). */
enum BitNetMCU_qtype {
    BITNETMCU_BINARY = 1, /* 1 bit: 1 = +1, 0 = -1 */
    BITNETMCU_TERNARY,    /* base-3 groups of 10 trits per uint16_t: +1 -> 0, -1 -> 1, 0 -> 2 */
    BITNETMCU_2BITSYM,    /* sign bit (1 = negative), magnitude bit (0 -> 1, 1 -> 3); weights x2 */
    BITNETMCU_4BITSYM,    /* sign bit, 3-bit magnitude m: |w| = 2m + 1 (weights x2) */
    BITNETMCU_4BIT,       /* two's complement -8 .. 7 */
    BITNETMCU_8BIT,       /* two's complement -128 .. 127 */
    BITNETMCU_FP130,      /* sign bit, 3-bit exponent e: |w| = 2^e */
    BITNETMCU_NF4         /* 4-bit index into BitNetMCU_nf4_levels */
};

/* NormalFloat4 levels scaled to int8 (QLoRA's NF4 table x 127, rounded). */
extern const int8_t BitNetMCU_nf4_levels[16];

/* Fully connected layer: output[o] = sum_i w[o][i] * input[i], 32-bit sums, no bias. */
void BitNetMCU_fc(const int8_t *input, uint32_t n_in, const void *weights, enum BitNetMCU_qtype qtype,
                  int32_t *output, uint32_t n_out);

/* ShiftNorm + ReLU: k = smallest shift with (max >> k) <= 127; output = clip((x + 2^k/2) >> k, 0, 127)
 * for x > 0, else 0. Returns k. */
uint32_t BitNetMCU_shiftnorm_relu(const int32_t *input, int8_t *output, uint32_t n);

/* 3x3 convolution of one size x size channel (no padding) with int8 weights, then ReLU and a fixed
 * right shift: output[(size-2)^2] = max(0, sum) >> shift. */
void BitNetMCU_conv3x3_relu(const int32_t *input, uint32_t size, const int8_t *weights, uint32_t shift,
                            int32_t *output);

/* 2x2 max pooling, stride 2, of one size x size channel (size even). */
void BitNetMCU_maxpool2(const int32_t *input, uint32_t size, int32_t *output);

/* Index of the first maximum. */
uint32_t BitNetMCU_argmax(const int32_t *values, uint32_t n);

#endif
