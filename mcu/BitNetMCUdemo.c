/*
 * BitNetMCU demo: runs the exported model (BitNetMCU_model.h) on MNIST test images and prints, per
 * image, the prediction, the label and the cost of the inference; then a summary. Exits non-zero if
 * any prediction differs from the one the host computed (C engine and Python reference agree on it).
 *
 * Test images come from BitNetMCU_MNIST_test_data.h (a few, in flash) or, on the emulator, from the
 * test-data blob QEMU loads into RAM at BITNETMCU_TESTSET_ADDR (all 10,000). Both are written by
 * testdata.py, which documents the blob: "BNMT", uint32 version, count, inputs (bytes per image), model
 * header fingerprint, then int8 images[count][inputs], uint8 labels[count], uint8 predictions[count].
 * Test data made for another model header is refused: at compile time (header) or at start (blob).
 */
#include <stdint.h>

#include "BitNetMCU_model.h"
#include "platform.h"

#ifndef BITNETMCU_MODEL_FORMAT
#error "BitNetMCU_model.h names no format: it predates this engine; export the model again with exportquant.py"
#endif

#define TESTSET_MAGIC 0x544D4E42u   /* testdata.BLOB_MAGIC, "BNMT" read as a little-endian word */
#define TESTSET_VERSION 2           /* testdata.BLOB_VERSION (tests/test_mcu.py holds them equal) */

#ifdef BITNETMCU_TESTSET_ADDR
#define TESTSET ((const uint32_t *)BITNETMCU_TESTSET_ADDR)
#define TESTSET_IS_VALID (TESTSET[0] == TESTSET_MAGIC && TESTSET[1] == (uint32_t)TESTSET_VERSION && \
                          TESTSET[3] == BITNETMCU_MODEL_INPUTS && TESTSET[4] == BITNETMCU_MODEL_FINGERPRINT)
#define TEST_COUNT (TESTSET[2])
#define TEST_IMAGES ((const int8_t *)(TESTSET + 5))
#define TEST_LABELS ((const uint8_t *)(TEST_IMAGES + (uint32_t)TEST_COUNT * BITNETMCU_MODEL_INPUTS))
#define TEST_PREDICTIONS (TEST_LABELS + TEST_COUNT)
typedef uint64_t total_t;   /* 10,000 inferences of millions of instructions */

/* Image i of the blob, in place. */
static const int8_t *test_image(uint32_t i, int8_t *buffer)
{
    (void)buffer;
    return TEST_IMAGES + i * BITNETMCU_MODEL_INPUTS;
}
#else
#include "BitNetMCU_MNIST_test_data.h"
#if BITNETMCU_TEST_MODEL_FINGERPRINT != BITNETMCU_MODEL_FINGERPRINT
#error "BitNetMCU_MNIST_test_data.h was made for another model header: run test_inference.py to refresh it"
#endif
#define TESTSET_IS_VALID 1
#define TEST_COUNT ((uint32_t)BITNETMCU_TEST_IMAGES)
#define TEST_LABELS ((const uint8_t *)BitNetMCU_test_labels)
#define TEST_PREDICTIONS ((const uint8_t *)BitNetMCU_test_predictions)
typedef uint32_t total_t;   /* a few images: 32 bits hold the total, and its printing is shorter */

/* The images in flash are run-length coded; they are visited in order, so each is unpacked once. */
static const int8_t *test_image(uint32_t i, int8_t *buffer)
{
    static const uint8_t *code = BitNetMCU_test_images;
    if (i == 0) code = BitNetMCU_test_images;
    code = BitNetMCU_unpack_test_image(code, buffer, BITNETMCU_MODEL_INPUTS);
    return buffer;
}
#endif

#define STRING(x) STRING_OF(x)
#define STRING_OF(x) #x
#define VERBOSE_LIMIT 20u        /* print every image only for small test sets */
#define STACK_PAINT 0x5AA5F00Du
#ifndef STACK_PROBE_WORDS
#define STACK_PROBE_WORDS 256u   /* how far below the caller's frame the paint reaches (1 KB) */
#endif

static void print(const char *s)
{
    while (*s) platform_putc(*s++);
}

/* v / 10 by binary long division, shifting v left one bit at a time: no divide instruction and no
 * variable 64-bit shift, so no libgcc helper. */
static total_t div10(total_t v, uint32_t *remainder)
{
    total_t quotient = 0;
    uint32_t rem = 0;
    for (uint32_t bit = 0; bit < 8u * sizeof v; bit++) {
        rem = (rem << 1) | (uint32_t)(v >> (8u * sizeof v - 1u));
        v <<= 1;
        quotient <<= 1;
        if (rem >= 10u) {
            rem -= 10u;
            quotient |= 1u;
        }
    }
    *remainder = rem;
    return quotient;
}

static void print_number(total_t v)
{
    char digits[20];
    uint32_t n = 0, rem;
    do {
        v = div10(v, &rem);
        digits[n++] = (char)('0' + rem);
    } while (v);
    while (n) platform_putc(digits[--n]);
}

void report_trap(uint32_t cause, uint32_t pc)
{
    print("\ntrap: mcause ");
    print_number(cause);
    print(" at pc ");
    print_number(pc);
    print("\n");
    platform_exit(3);
}

#ifdef BITNETMCU_TESTSET_ADDR
/* Peak stack of one inference: paint the free stack below this frame, infer, find the deepest
 * overwritten word. (The chip build leaves this to make chip-sim, which watches the stack pointer.) */
static __attribute__((noinline)) uint32_t measure_stack(const int8_t *image, int32_t *logits)
{
    uint32_t *sp;
    __asm__ volatile("mv %0, sp" : "=r"(sp));
    for (uint32_t i = 1; i <= STACK_PROBE_WORDS; i++) sp[-(int32_t)i] = STACK_PAINT;
    BitNetMCU_model_infer(image, logits);
    uint32_t deepest = 0;
    for (uint32_t i = 1; i <= STACK_PROBE_WORDS; i++)
        if (sp[-(int32_t)i] != STACK_PAINT) deepest = i;
    return deepest << 2;
}
#endif

int main(void)
{
    platform_init();
    if (!TESTSET_IS_VALID) {
        print("error: the test data is not a version-" STRING(TESTSET_VERSION) " BitNetMCU blob made for this model "
              "header; run test_inference.py to refresh it\n");
        platform_exit(2);
    }
    int32_t logits[BITNETMCU_MODEL_CLASSES];
    uint32_t count = TEST_COUNT, correct = 0, mismatches = 0;
    total_t total = 0;
    uint32_t least = 0xFFFFFFFFu, most = 0;
    int8_t buffer[BITNETMCU_MODEL_INPUTS];
    const int8_t *image = buffer;
    for (uint32_t i = 0; i < count; i++) {
        image = test_image(i, buffer);
        uint32_t start = platform_counter();
        uint32_t predicted = BitNetMCU_model_infer(image, logits);
        uint32_t cost = platform_counter() - start;
        total += cost;
        if (cost < least) least = cost;
        if (cost > most) most = cost;
        correct += predicted == TEST_LABELS[i];
        if (predicted != TEST_PREDICTIONS[i]) {
            mismatches++;
            print("MISMATCH ");
        }
        if (count <= VERBOSE_LIMIT || predicted != TEST_PREDICTIONS[i]) {
            print("image ");
            print_number(i);
            print(": predicted ");
            print_number(predicted);
            print(", label ");
            print_number(TEST_LABELS[i]);
            print(", ");
            print_number(cost);
            print(" ");
            print(platform_counter_name);
            print("\n");
        }
    }
    print("images ");
    print_number(count);
    print(" correct ");
    print_number(correct);
    print(" mismatches ");
    print_number(mismatches);
    print("\n");
    print(platform_counter_name);
    print(" per inference: total ");
    print_number(total);
    print(" min ");
    print_number(least);
    print(" max ");
    print_number(most);
#ifdef BITNETMCU_TESTSET_ADDR
    print("\npeak stack of one inference: ");
    print_number(measure_stack(image, logits));
    print(" bytes");
#endif
    print("\n");
    platform_exit(mismatches ? 1 : 0);   /* a chip has nowhere to return to: stop here, the report stays */
    return 0;
}
