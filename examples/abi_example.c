/*
 * Calling the dcgen_quant C ABI from plain C (no Python, no torch).
 *
 * Build (see csrc/CMakeLists.txt, or by hand against an installed library):
 *   cc -std=c99 abi_example.c -I<prefix>/include -I$CUDA_HOME/include -L<libdir> -ldcgen_quant \
 *      -L$CUDA_HOME/lib64 -lcudart_static -lpthread -ldl -lrt -lm -Wl,-rpath,<libdir>
 *
 * 1. Shows that bad arguments come back as status codes with a message (never a crash): a NULL
 *    pointer, K not a multiple of the group, architectures this build has no kernel for.
 * 2. Quantizes a small activation on the CPU (dcgq_quantize_act_host), with signed and with
 *    unsigned (act_unsigned = 1) INT4 codes.
 * 3. With a supported GPU, for signed and unsigned activations: quantizes on the GPU (must equal
 *    the CPU bit for bit), runs the INT4 W4A4 GEMM with the low-rank branch and bias, and
 *    compares with a double-precision host computation. Without one it reports
 *    DCGQ_ERROR_NO_DEVICE (or the missing architecture).
 * Exit status 0 when every check behaves as documented.
 */
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dcgen_quant/dcgen_quant.h"

static int failures = 0;

static void expect(const char* what, dcgq_status got, dcgq_status want) {
  printf("%-58s -> %s", what, dcgq_error_string(got));
  if (got != DCGQ_SUCCESS) printf(": %s", dcgq_last_error_message());
  printf("\n");
  if (got != want) {
    printf("  UNEXPECTED: expected %s\n", dcgq_error_string(want));
    failures++;
  }
}

/* ---- small host helpers ---------------------------------------------------------------- */

static uint32_t rng_state = 12345u;
static float uniform(void) { /* xorshift32 in [-1, 1) */
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 17;
  rng_state ^= rng_state << 5;
  return (float)(rng_state >> 8) / 8388608.0f - 1.0f;
}

static uint16_t to_bf16(float f) { /* round to nearest even (finite inputs) */
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static double from_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* canonical layout; signed INT4 (-8..7) or, with is_unsigned, unsigned (0..15) */
static int code_at(const uint8_t* row, int64_t e, int is_unsigned) {
  int nib = (row[e / 2] >> (4 * (e % 2))) & 0xf;
  return (nib >= 8 && !is_unsigned) ? nib - 16 : nib;
}

static int has_arch(const char* arch) {
  const char* list = dcgq_built_architectures();
  size_t n = strlen(arch);
  for (const char* p = list; (p = strstr(p, arch)) != NULL; p += n) {
    if ((p == list || p[-1] == ';') && (p[n] == '\0' || p[n] == ';')) return 1;
  }
  return 0;
}

/* ---- 1. argument validation (no GPU needed) ---------------------------------------------- */

static void check_validation(void) {
  dcgq_quantize_act_args qa;
  dcgq_gemm_w4a4_args ga;
  memset(&qa, 0, sizeof(qa));
  memset(&ga, 0, sizeof(ga));

  expect("quantize_act(args = NULL)", dcgq_quantize_act(NULL, 0), DCGQ_ERROR_INVALID_ARGUMENT);

  qa.fmt = DCGQ_FORMAT_INT4;
  qa.layout = DCGQ_LAYOUT_CANONICAL;
  qa.x_dtype = DCGQ_DTYPE_BFLOAT16;
  qa.m = 4;
  qa.k = 128;
  qa.x = NULL; /* missing input */
  expect("quantize_act(x = NULL)", dcgq_quantize_act(&qa, 0), DCGQ_ERROR_INVALID_ARGUMENT);

  ga.fmt = DCGQ_FORMAT_INT4;
  ga.scale_dtype = DCGQ_DTYPE_BFLOAT16;
  ga.io_dtype = DCGQ_DTYPE_BFLOAT16;
  ga.out_dtype = DCGQ_DTYPE_BFLOAT16;
  ga.m = 4;
  ga.n = 8;
  ga.k = 96; /* not a multiple of the INT4 group (64) */
  expect("gemm_w4a4(k = 96, int4)", dcgq_gemm_w4a4(&ga, 0), DCGQ_ERROR_INVALID_ARGUMENT);

  ga.fmt = DCGQ_FORMAT_NVFP4;
  ga.scale_dtype = DCGQ_DTYPE_FLOAT8_E4M3;
  ga.k = 128;
  ga.wtscale = NULL; /* NVFP4 needs its tensor scale */
  expect("gemm_w4a4(nvfp4, wtscale = NULL)", dcgq_gemm_w4a4(&ga, 0), DCGQ_ERROR_INVALID_ARGUMENT);

  ga.act_unsigned = 1; /* unsigned activation codes exist for INT4 only */
  expect("gemm_w4a4(nvfp4, act_unsigned = 1)", dcgq_gemm_w4a4(&ga, 0), DCGQ_ERROR_INVALID_ARGUMENT);
  qa.act_unsigned = 2; /* a flag: 0 or 1 */
  expect("quantize_act(act_unsigned = 2)", dcgq_quantize_act(&qa, 0), DCGQ_ERROR_INVALID_ARGUMENT);

  expect("capability: gemm_w4a4 int4 on sm_75",
         dcgq_check_compute_capability(DCGQ_OP_GEMM_W4A4, DCGQ_FORMAT_INT4, 7, 5),
         DCGQ_ERROR_UNSUPPORTED);
  expect("capability: gemm_w4a4 nvfp4 on sm_90",
         dcgq_check_compute_capability(DCGQ_OP_GEMM_W4A4, DCGQ_FORMAT_NVFP4, 9, 0),
         DCGQ_ERROR_UNSUPPORTED);
  expect("capability: gemm_w4a4 int4 on sm_90",
         dcgq_check_compute_capability(DCGQ_OP_GEMM_W4A4, DCGQ_FORMAT_INT4, 9, 0),
         has_arch("90a") ? DCGQ_SUCCESS : DCGQ_ERROR_ARCH_NOT_BUILT);
  expect("capability: quantize_act nvfp4 on sm_86",
         dcgq_check_compute_capability(DCGQ_OP_QUANTIZE_ACT, DCGQ_FORMAT_NVFP4, 8, 6),
         (has_arch("80") || has_arch("86")) ? DCGQ_SUCCESS : DCGQ_ERROR_ARCH_NOT_BUILT);
}

/* ---- 2./3. a small problem, on the CPU and (if present) the GPU -------------------------- */

enum { M = 37, N = 96, K = 256, R = 16, G = 64 };

typedef struct {
  uint16_t x[M * K], smooth[K], down[K * R], w[N * K], up[N * R], bias[N];
  uint8_t q[M * K / 2], qw[N * K / 2];
  uint16_t scales[M * K / G], wscales_nk[N * K / G], wscales[(K / G) * N];
  float lora_act[M * R];
  int act_unsigned; /* q, scales: signed (0) or unsigned (1) activation codes */
} problem;

static dcgq_quantize_act_args act_args(problem* p, int with_lora) {
  dcgq_quantize_act_args a;
  memset(&a, 0, sizeof(a));
  a.fmt = DCGQ_FORMAT_INT4;
  a.layout = DCGQ_LAYOUT_CANONICAL;
  a.act_unsigned = p->act_unsigned;
  a.x_dtype = DCGQ_DTYPE_BFLOAT16;
  a.m = M, a.k = K, a.rank = with_lora ? R : 0;
  a.x = p->x, a.ldx = K, a.smooth = p->smooth;
  a.lora_down = with_lora ? p->down : NULL, a.ld_lora_down = R;
  a.q = p->q, a.ldq = K / 2, a.scales = p->scales, a.ld_scales = K / G;
  a.lora_act = with_lora ? p->lora_act : NULL, a.ld_lora_act = R;
  return a;
}

static void make_problem(problem* p) {
  for (int i = 0; i < M * K; ++i) p->x[i] = to_bf16(2.0f * uniform());
  for (int i = 0; i < K; ++i) p->smooth[i] = to_bf16(1.0f + 0.5f * uniform());
  for (int i = 0; i < K * R; ++i) p->down[i] = to_bf16(uniform() / 16.0f);
  for (int i = 0; i < N * K; ++i) p->w[i] = to_bf16(uniform() / 16.0f);
  for (int i = 0; i < N * R; ++i) p->up[i] = to_bf16(uniform() / 4.0f);
  for (int i = 0; i < N; ++i) p->bias[i] = to_bf16(uniform());
  /* weights: the same INT4 quantizer (per output row, groups along K), no smoothing */
  dcgq_quantize_act_args wa;
  memset(&wa, 0, sizeof(wa));
  wa.fmt = DCGQ_FORMAT_INT4;
  wa.x_dtype = DCGQ_DTYPE_BFLOAT16;
  wa.m = N, wa.k = K, wa.x = p->w, wa.ldx = K;
  wa.q = p->qw, wa.ldq = K / 2, wa.scales = p->wscales_nk, wa.ld_scales = K / G;
  expect("quantize_act_host(weights [96, 256])", dcgq_quantize_act_host(&wa), DCGQ_SUCCESS);
  for (int n = 0; n < N; ++n)
    for (int g = 0; g < K / G; ++g) p->wscales[g * N + n] = p->wscales_nk[n * (K / G) + g];
}

/* y = sum_g sa * sw * dot + lora_act @ up^T + bias, in double */
static double reference(const problem* p, int m, int n) {
  double y = 0.0;
  for (int g = 0; g < K / G; ++g) {
    long dot = 0;
    for (int e = g * G; e < (g + 1) * G; ++e)
      dot += (long)code_at(p->q + m * (K / 2), e, p->act_unsigned) *
             code_at(p->qw + n * (K / 2), e, 0);
    y += from_bf16(p->scales[m * (K / G) + g]) * from_bf16(p->wscales[g * N + n]) * (double)dot;
  }
  for (int r = 0; r < R; ++r) y += (double)p->lora_act[m * R + r] * from_bf16(p->up[n * R + r]);
  return y + from_bf16(p->bias[n]);
}

#define CUDA_OK(call) \
  (((call) == cudaSuccess) ? 1 : (printf("  %s failed\n", #call), failures++, 0))

typedef struct {
  void *x, *smooth, *down, *q, *scales, *lora_act, *qw, *wscales, *up, *bias, *y;
} device_buffers;

/* One GPU pass with the activation codes of p->act_unsigned: p->q, p->scales and p->lora_act
 * hold the CPU quantizer's results for the same setting. */
static void gpu_pass(problem* p, const device_buffers* d) {
  const char* kind = p->act_unsigned ? "unsigned" : "signed";
  char what[96];
  size_t sq = sizeof(p->q), ssc = sizeof(p->scales), sla = sizeof(p->lora_act);
  cudaMemset(d->q, 0xab, sq);
  cudaMemset(d->scales, 0xab, ssc);
  cudaMemset(d->y, 0xff, sizeof(float) * M * N);

  dcgq_quantize_act_args da = act_args(p, 1);
  da.x = d->x, da.smooth = d->smooth, da.lora_down = d->down, da.q = d->q;
  da.scales = d->scales, da.lora_act = (float*)d->lora_act;
  snprintf(what, sizeof(what), "quantize_act on the GPU (%s codes)", kind);
  expect(what, dcgq_quantize_act(&da, 0), DCGQ_SUCCESS);

  dcgq_gemm_w4a4_args ga;
  memset(&ga, 0, sizeof(ga));
  ga.fmt = DCGQ_FORMAT_INT4;
  ga.act_unsigned = p->act_unsigned;
  ga.scale_dtype = ga.io_dtype = DCGQ_DTYPE_BFLOAT16;
  ga.out_dtype = DCGQ_DTYPE_FLOAT32;
  ga.m = M, ga.n = N, ga.k = K, ga.rank = R;
  ga.q = d->q, ga.ldq = K / 2, ga.scales = d->scales, ga.ld_scales = K / G;
  ga.qweight = d->qw, ga.ldqw = K / 2, ga.wscales = d->wscales, ga.ld_wscales = N;
  ga.lora_act = (const float*)d->lora_act, ga.ld_lora_act = R;
  ga.proj_up = d->up, ga.ld_proj_up = R;
  ga.bias = d->bias, ga.out = d->y, ga.ldo = N;
  snprintf(what, sizeof(what), "gemm_w4a4 on the GPU (%s activations)", kind);
  expect(what, dcgq_gemm_w4a4(&ga, 0), DCGQ_SUCCESS);
  CUDA_OK(cudaDeviceSynchronize());

  uint8_t* gq = malloc(sq);
  uint16_t* gsc = malloc(ssc);
  float* gla = malloc(sla);
  float* gy = malloc(sizeof(float) * M * N);
  cudaMemcpy(gq, d->q, sq, cudaMemcpyDeviceToHost);
  cudaMemcpy(gsc, d->scales, ssc, cudaMemcpyDeviceToHost);
  cudaMemcpy(gla, d->lora_act, sla, cudaMemcpyDeviceToHost);
  cudaMemcpy(gy, d->y, sizeof(float) * M * N, cudaMemcpyDeviceToHost);

  const int q_equal = memcmp(gq, p->q, sq) == 0 && memcmp(gsc, p->scales, ssc) == 0;
  printf("GPU codes and scales equal the CPU's bit for bit (%s): %s\n", kind,
         q_equal ? "yes" : "NO");
  if (!q_equal) failures++;
  double la_err = 0.0, la_max = 0.0, y_err = 0.0, y_max = 0.0;
  for (int i = 0; i < M * R; ++i) {
    la_err = fmax(la_err, fabs((double)gla[i] - p->lora_act[i]));
    la_max = fmax(la_max, fabs((double)p->lora_act[i]));
  }
  memcpy(p->lora_act, gla, sla); /* the GEMM reference uses the GPU's lora_act */
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double ref = reference(p, m, n);
      y_err = fmax(y_err, fabs(gy[m * N + n] - ref));
      y_max = fmax(y_max, fabs(ref));
    }
  printf("%s: lora_act max |GPU - CPU| / max|CPU| = %.3g; y max |GPU - ref| / max|ref| = %.3g\n",
         kind, la_err / la_max, y_err / y_max);
  if (!(la_err <= 1e-5 * la_max) || !(y_err <= 1e-5 * y_max)) failures++;
  free(gq), free(gsc), free(gla), free(gy);
}

static void run_gpu(problem* p) {
  int devices = 0, dev = 0, major = 0, minor = 0;
  dcgq_quantize_act_args qa = act_args(p, 1);
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    cudaGetLastError();
    /* host pointers are fine here: the call fails at device detection, before any launch */
    expect("quantize_act on this machine (no GPU)", dcgq_quantize_act(&qa, 0),
           DCGQ_ERROR_NO_DEVICE);
    printf("no CUDA device: skipping the GPU run\n");
    return;
  }
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (dcgq_check_compute_capability(DCGQ_OP_GEMM_W4A4, DCGQ_FORMAT_INT4, major, minor) !=
      DCGQ_SUCCESS) {
    printf("GPU sm_%d%d: %s; skipping the GPU run\n", major, minor, dcgq_last_error_message());
    return;
  }
  printf(
      "GPU sm_%d%d: gemm_w4a4 kernel %s\n", major, minor,
      dcgq_selected_kernel(DCGQ_OP_GEMM_W4A4, DCGQ_FORMAT_INT4, DCGQ_VARIANT_AUTO, major, minor));

  /* device copies of the inputs; outputs are poisoned by each pass */
  device_buffers d;
  if (!(CUDA_OK(cudaMalloc(&d.x, sizeof(p->x))) &&
        CUDA_OK(cudaMalloc(&d.smooth, sizeof(p->smooth))) &&
        CUDA_OK(cudaMalloc(&d.down, sizeof(p->down))) && CUDA_OK(cudaMalloc(&d.q, sizeof(p->q))) &&
        CUDA_OK(cudaMalloc(&d.scales, sizeof(p->scales))) &&
        CUDA_OK(cudaMalloc(&d.lora_act, sizeof(p->lora_act))) &&
        CUDA_OK(cudaMalloc(&d.qw, sizeof(p->qw))) &&
        CUDA_OK(cudaMalloc(&d.wscales, sizeof(p->wscales))) &&
        CUDA_OK(cudaMalloc(&d.up, sizeof(p->up))) &&
        CUDA_OK(cudaMalloc(&d.bias, sizeof(p->bias))) &&
        CUDA_OK(cudaMalloc(&d.y, sizeof(float) * M * N))))
    return;
  cudaMemcpy(d.x, p->x, sizeof(p->x), cudaMemcpyHostToDevice);
  cudaMemcpy(d.smooth, p->smooth, sizeof(p->smooth), cudaMemcpyHostToDevice);
  cudaMemcpy(d.down, p->down, sizeof(p->down), cudaMemcpyHostToDevice);
  cudaMemcpy(d.qw, p->qw, sizeof(p->qw), cudaMemcpyHostToDevice);
  cudaMemcpy(d.wscales, p->wscales, sizeof(p->wscales), cudaMemcpyHostToDevice);
  cudaMemcpy(d.up, p->up, sizeof(p->up), cudaMemcpyHostToDevice);
  cudaMemcpy(d.bias, p->bias, sizeof(p->bias), cudaMemcpyHostToDevice);

  for (int uns = 0; uns <= 1; ++uns) {
    p->act_unsigned = uns;
    dcgq_quantize_act_args ha = act_args(p, 1); /* the CPU results this pass compares with */
    expect(uns ? "quantize_act_host(unsigned codes)" : "quantize_act_host(signed codes)",
           dcgq_quantize_act_host(&ha), DCGQ_SUCCESS);
    gpu_pass(p, &d);
  }
  cudaFree(d.x), cudaFree(d.smooth), cudaFree(d.down), cudaFree(d.q), cudaFree(d.scales);
  cudaFree(d.lora_act), cudaFree(d.qw), cudaFree(d.wscales), cudaFree(d.up), cudaFree(d.bias);
  cudaFree(d.y);
}

int main(void) {
  printf("dcgen_quant %s (ABI %d), architectures: %s\n", dcgq_version(), dcgq_abi_version(),
         dcgq_built_architectures());
  check_validation();

  problem* p = calloc(1, sizeof(problem));
  make_problem(p);
  unsigned long sum[2] = {0, 0};
  for (int uns = 1; uns >= 0; --uns) { /* ends with the signed codes in p */
    p->act_unsigned = uns;
    dcgq_quantize_act_args qa = act_args(p, 1);
    expect(uns ? "quantize_act_host(x [37, 256], rank 16, unsigned)"
               : "quantize_act_host(x [37, 256], rank 16)",
           dcgq_quantize_act_host(&qa), DCGQ_SUCCESS);
    for (int i = 0; i < M * K / 2; ++i) sum[uns] = sum[uns] * 31u + p->q[i];
  }
  printf("host codes checksum: %lu (signed), %lu (unsigned)\n", sum[0], sum[1]);
  run_gpu(p);
  free(p);
  printf("%s\n", failures ? "FAILED" : "OK");
  return failures ? 1 : 0;
}
