/*
 * BitNetMCU inference engine: integer kernels for low-bit quantized networks.
 *
 * C99, no malloc, no float, no state: every kernel works on buffers the caller provides.
 * A generated model header (exportquant.py -> BitNetMCU_model.h) holds the weights and one
 * function, BitNetMCU_model_infer(), that calls these kernels in order.
 *
 * Multiplier-free: with BITNETMCU_NO_MUL defined (automatic on RISC-V cores without a multiplier,
 * e.g. RV32EC on the CH32V003), the Binary, Ternary, 2bitsym, 4bitsym, 4bit, FP130 and NF4 kernels, the
 * int8-activation convolutions and the 4-bit activation kernels use only shifts and adds. The 8bit fully
 * connected kernels and the int32-plane convolutions multiply in every build.
 */
#ifndef BITNETMCU_INFERENCE_H
#define BITNETMCU_INFERENCE_H

#include <stdint.h>

/* The model header format this engine reads (exportquant.py's HEADER_FORMAT). A model header names the format
 * it was exported in and stops the build (#error) on any other; a header older than the check names none, and
 * the programs that include one stop on that. Bumped whenever a kernel reads its weights differently or a kernel
 * a header calls changes (3: the 8-bit requantization BitNetMCU_requantize8 in place of the ShiftNorm). */
#define BITNETMCU_ENGINE_FORMAT 3

#if defined(__riscv) && !defined(__riscv_mul) && !defined(__riscv_zmmul) && !defined(BITNETMCU_NO_MUL)
#define BITNETMCU_NO_MUL 1
#endif

/* NormalFloat4 levels scaled to int8 (QLoRA's NF4 table x 127, rounded). */
extern const int8_t BitNetMCU_nf4_levels[16];

/*
 * Fully connected layers: sums[o] = sum_i w[o][i] * input[i], 32-bit, no bias. One kernel per weight
 * type and layout. Weight codes are packed MSB-first into uint32_t words:
 *   Binary   1 bit: 1 = +1, 0 = -1
 *   2bitsym  sign bit (1 = negative), magnitude bit: |w| = 1 or 3   (the levels +-0.5, +-1.5, doubled)
 *   4bitsym  sign bit, 3-bit magnitude m: |w| = 2m + 1                (the levels +-0.5 .. +-7.5, doubled)
 *   5bitsym  sign bit, 4-bit magnitude m: |w| = 2m + 1                (the levels +-0.5 .. +-15.5, doubled),
 *            6 codes a word in bits 31-2 (bits 1-0 unused)
 *   4bit     two's complement -8 .. 7
 *   8bit     two's complement -128 .. 127
 *   FP130    sign bit, 3-bit exponent e: |w| = 2^e
 *   NF2      sign bit (1 = negative), magnitude bit: |w| = 10 (1) or 3 (0)   (NormalFloat2's +-1, +-0.2998)
 *   NF4      4-bit index into BitNetMCU_nf4_levels
 *
 * Input-major layout, BitNetMCU_fc_<type>() (the default export): for each input, the codes of all
 * outputs, padded to whole words. The kernel skips inputs equal to `zero` entirely and turns each other
 * input into a small table of its products with every code, so the work per weight is a table look-up
 * and an add; the non-zero inputs go two at a time, so each sum is loaded and stored once per pair. Binary and the 2-bit types go by groups of 4 and 2 inputs instead: for each group, per output the
 * group's codes side by side (first input in the high bits) as one 4-bit code, and the table holds the
 * group's summed products, one look-up for 4 or 2 weights (an odd input count pads the last group with
 * zero codes). Skipped inputs contribute zero * rowsums[o] (rowsums[o] = sum of row o's weights; unused
 * and may be null when zero is 0). Hidden layers pass zero = 0; the first layer passes the image's
 * background value. `sums` must hold n_out rounded up to a whole word of codes (8 outputs for Binary,
 * the 2-bit and the 4-bit types, 6 for 5bitsym, 4 for 8bit).
 *
 * Output-major layout, BitNetMCU_fc_rows_<type>() (the original BitNetMCU's layout): for each output,
 * the codes of all inputs, padded to whole words; `sums` holds exactly n_out.
 *
 * Ternary has one layout: for each output, groups of 10 trits per uint16_t (+1 -> 0, -1 -> 1, 0 -> 2),
 * base 3 MSB-first, stored as ceil(v * 65536 / 3^10) so that x3 brings each trit into bits 16-17.
 */
/* The arguments of a hidden layer, whose inputs are ReLU outputs: skip the zeros, which add nothing. */
#define BITNETMCU_NO_BACKGROUND 0
#define BITNETMCU_NO_ROWSUMS ((const int16_t *)0)

#define BITNETMCU_FC_KERNEL(name) \
    void name(const int8_t *input, uint32_t n_in, const void *weights, int32_t *sums, uint32_t n_out)
#define BITNETMCU_FC_COLUMNS_KERNEL(name)                                                           \
    void name(const int8_t *input, uint32_t n_in, const void *weights, int32_t *sums, uint32_t n_out, \
              int32_t zero, const int16_t *rowsums)

/* Window stems (WindowFCMNIST): the input-major kernel on a rows x cols window of a larger image whose rows lie
 * `stride` bytes apart, read in place: input[r * stride + c] is the layer's input r * cols + c. cols is a multiple
 * of 4, so that a group of 1- or 2-bit inputs never spans two rows. Inputs equal to `zero` are skipped and
 * background[o] added instead: zero x the sum of output o's weights, made once per image for every window
 * (BitNetMCU_background_sums). */
#define BITNETMCU_FC_WINDOW_KERNEL(name)                                                                    \
    void name(const int8_t *input, uint32_t cols, uint32_t rows, uint32_t stride, const void *weights,      \
              int32_t *sums, uint32_t n_out, int32_t zero, const int32_t *background)

/* background[o] = zero x rowsums[o], o < n: the share of the skipped inputs in a window stem's sums. */
void BitNetMCU_background_sums(int32_t zero, const int16_t *rowsums, int32_t *background, uint32_t n);

/* The bit-packed types, one row each: X(name, id, bits per code). Every row declares
 * BitNetMCU_fc_<name>(), BitNetMCU_fc_window_<name>() and BitNetMCU_fc_rows_<name>() here and defines both in BitNetMCU_inference.c;
 * the row of the same name in BitNetMCU.py's QUANT_TYPES names these kernels. */
#define BITNETMCU_FC_TYPES(X) \
    X(Binary, BINARY, 1)      \
    X(2bitsym, TWOBITSYM, 2)  \
    X(4bitsym, FOURBITSYM, 4) \
    X(5bitsym, FIVEBITSYM, 5) \
    X(4bit, FOURBIT, 4)       \
    X(8bit, EIGHTBIT, 8)      \
    X(FP130, FP130, 4)        \
    X(NF2, NF2, 2)            \
    X(NF4, NF4, 4)

#define BITNETMCU_DECLARE_FC(name, id, bits) \
    BITNETMCU_FC_COLUMNS_KERNEL(BitNetMCU_fc_##name); \
    BITNETMCU_FC_WINDOW_KERNEL(BitNetMCU_fc_window_##name); \
    BITNETMCU_FC_KERNEL(BitNetMCU_fc_rows_##name);
BITNETMCU_FC_TYPES(BITNETMCU_DECLARE_FC)
BITNETMCU_FC_KERNEL(BitNetMCU_fc_rows_Ternary);

/* ReLU and 8-bit activations: output = round(127 x / max), half up, for x > 0, else 0 (max: the largest of the n
 * sums), exactly what the float model's activation quantizer computes, so that the integer model predicts what
 * the float model does. A 7-bit long division per positive sum, without a divider; sums of 2^23 or more are
 * shifted right, all by the same amount, until the largest is below 2^23. */
void BitNetMCU_requantize8(const int32_t *sums, int8_t *output, uint32_t n);

/* 4-bit activations (activation_bits: 4). A layer multiplies its inputs 0..15 by look-up: products[16 * a + code]
 * is a times the weight of `code`, one int16 table of 256 per 4-bit weight type, in flash, so any codebook (NF4
 * included) costs a code extraction, a load and an add per weight, without a multiplier. Weights in the
 * input-major layout of the type; inputs of 0 are skipped; `sums` holds n_out rounded up to 8. */
void BitNetMCU_fc_products(const int8_t *input, uint32_t n_in, const uint32_t *weights, int32_t *sums, uint32_t n_out,
                           const int16_t *products);

/* The sums of a layer to 4-bit activations, ReLU included (0 for a sum <= 0), with M the largest sum:
 * _reciprocal: t = the smallest exponent with 15 x 2^t >= M, plus 7; s = min(floor(15 x 2^t / M), 255);
 *              output = min((sum x s) >> t, 15). s x sum by shifts and adds without a multiplier; needs M <= 15 x 2^21.
 * _shift:      k = the smallest shift with (M >> k) <= 15; output = min((sum + 2^k / 2) >> k, 15). */
void BitNetMCU_requantize4_reciprocal(const int32_t *sums, int8_t *output, uint32_t n);
void BitNetMCU_requantize4_shift(const int32_t *sums, int8_t *output, uint32_t n);

/* A window stem layer's requantization by its fixed shift: output[i] = clamp((sums[i] + 2^shift / 2) >> shift,
 * 0, 127), the 7-bit activations it was trained with. */
void BitNetMCU_requantize(const int32_t *sums, uint32_t shift, int8_t *output, uint32_t n);

/* 3x3 convolution of one size x size channel (no padding) with int8 weights, then ReLU and a fixed
 * right shift: output[(size-2)^2] = max(0, sum) >> shift. Works in place (output == input). The
 * _image variant reads the int8 image, so the first layer needs no int32 copy of it. */
void BitNetMCU_conv3x3_relu(const int32_t *input, uint32_t size, const int8_t *weights, uint32_t shift,
                            int32_t *output);
void BitNetMCU_conv3x3_relu_image(const int8_t *input, uint32_t size, const int8_t *weights, uint32_t shift,
                                  int32_t *output);

/* 2x2 max pooling, stride 2, of one size x size channel (size even). Works in place. */
void BitNetMCU_maxpool2(const int32_t *input, uint32_t size, int32_t *output);

/*
 * Convolutions with int8 activations (conv_activations: int8). One size x size uint8 plane per channel;
 * each kernel convolves it (3x3, no padding) with one channel's 9 weights, adds the bias of `offset`
 * (the plane holds input - offset) and writes the requantized result:
 *     output[(size-2)^2] = clamp((sum + 2^shift / 2) >> shift, 0, 127)
 * Works in place (output == input). Weights: the 9 codes of the channel as the fully connected kernels
 * store them, packed MSB-first into uint32_t words (Ternary: 10 trits in one uint16_t). FP130 also carries
 * the channel's set-up in the 28 bits after its codes, for the shift it is called with (intmodel.py's
 * pack_fp130_conv writes them; its codes hold each exponent less the channel's smallest).
 * extent (or a null pointer: all of it): per output row y the columns [extent[2y], extent[2y+1]) whose
 * 3x3 window may hold an input other than `fill`; everywhere else every input is `fill`, so every output
 * is one value, written without computing it. Returns that value (the next layer's `fill`).
 * pool = 1: 2x2 max pooling of the output (size - 2 even) in the same pass: output[((size-2)/2)^2].
 * Without a multiplier every type's products are shifts and adds (BITNETMCU_NO_MUL). FP130 sums the
 * shifted inputs in two lanes of one register (positive weights low, negative high): a shift and an add
 * per weight.
 */
/* FP130's lane kernel in C takes planes up to this size (wider: per weight). Its two rows of lane sums, 8 x (size - 2)
 * bytes of stack, are sized by it: 16, the models' input size, keeps them at 112 bytes. On RISC-V the kernel is
 * assembly for the 16x16 models' plane sizes, 16, 14 and 6 (others: per weight). */
#ifndef BITNETMCU_MAX_PLANE
#define BITNETMCU_MAX_PLANE 16
#endif
/* The arguments the generated calls name: the plane holds the outputs of a convolution (no offset); no extent
 * (compute every output; the fill is then unused); the unsigned image's background (the fill of the first extent);
 * pooling or not. */
#define BITNETMCU_NO_OFFSET 0
#define BITNETMCU_NO_EXTENT ((const uint8_t *)0)
#define BITNETMCU_NO_FILL 0u
#define BITNETMCU_IMAGE_FILL 0u
#define BITNETMCU_NO_POOL 0u
#define BITNETMCU_POOL 1u
#define BITNETMCU_QCONV_KERNEL(name)                                                                        \
    uint32_t name(const uint8_t *input, int32_t offset, uint32_t size, const void *weights, uint32_t shift, \
                  uint8_t *output, const uint8_t *extent, uint32_t fill, uint32_t pool)
#define BITNETMCU_DECLARE_QCONV(name, id, bits) BITNETMCU_QCONV_KERNEL(BitNetMCU_qconv3x3_##name);
BITNETMCU_FC_TYPES(BITNETMCU_DECLARE_QCONV)
BITNETMCU_QCONV_KERNEL(BitNetMCU_qconv3x3_Ternary);

/* Per row of a size x size plane, the columns [extent[2y], extent[2y+1]) from its first to its last
 * non-zero pixel ([0, 0): none). */
void BitNetMCU_plane_extent(const uint8_t *plane, uint32_t size, uint8_t *extent);

/* The extent of a 3x3 convolution's output ((size-2) rows) from its input's (size rows): the output
 * columns whose window touches the input's extent. */
void BitNetMCU_conv_extent(const uint8_t *extent, uint32_t size, uint8_t *out);

/* The image as the int8-activation convolutions read it: plane[i] = image[i] - min(image), all >= 0.
 * Returns the minimum (the `offset` of the first convolution). */
int32_t BitNetMCU_unsigned_image(const int8_t *image, uint8_t *plane, uint32_t n);

/* 2x2 max pooling, stride 2, of a uint8 plane (size even). Works in place. */
void BitNetMCU_maxpool2_u8(const uint8_t *input, uint32_t size, uint8_t *output);

/* Index of the first maximum. */
uint32_t BitNetMCU_argmax(const int32_t *values, uint32_t n);

#endif
