// Tiled attention logits on the GPU for the CUDA kernel of attention_max: the [Q, N] attention block is never
// stored; a block recomputes the logits of its rows against one 64-key tile at a time in shared memory. The same
// tiles as window_stats.cu's, written to be shared by both: window_stats moves onto them (and the library's
// attention_max onto its kernel) once a GPU run has verified this file; until then window_stats keeps the copy a
// GPU run verified.
//
// Rows: the G*Q queries that read one kv head (G = H / Hkv) form its "rows"; row r is query i = r % Q of
// head g = r / Q, and since H = Hkv * G the rows of kv head bg = b * Hkv + kvh are contiguous in q viewed
// as [B * Hkv, G * Q, D]. A block works on a "row group", a run of rows_per_block of them (window_stats: whole
// heads), computed as 64-row GEMM sub-tiles.
//
//   pass 1  softmax_partials_kernel  grid (splits, groups, B*Hkv): a contiguous run of key tiles per block;
//                                    running (max, sum exp) per row -> partials [B*Hkv*G*Q, splits]
//   combine softmax_combine_kernel   one thread per row: merge the splits -> (max, 1/sum) per row
//   pass 2  (the op's own kernel)    grid (tiles, groups, B*Hkv): logits again, normalised, reduced per key
//
// Logit tiles come from one of two GEMM routines with the same output (fp32 dot products in shared memory):
//   * tile_dots_simt: fp32 FMAs on CUDA cores, any dtype and any D (inputs converted to fp32 on load);
//   * tile_dots_mma:  tensor cores (WMMA 16x16x16, fp32 accumulation) for fp16/bf16 with D % 8 == 0 on
//     sm_80+. Products of fp16/bf16 values are exact in fp32, so only the summation order differs from
//     fp32 math. CAKEKV_WINDOW_STATS_SIMT=1 in the environment forces the SIMT routine (for A/B checks).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "logits.cuh"

namespace cakekv::cuda {

namespace {

constexpr int kThreads = 256;           // 8 warps per block
constexpr int kRows = 64;               // query rows per GEMM sub-tile
constexpr int kKeys = 64;               // keys per tile
constexpr int kLdS = kKeys + 8;         // row stride (floats) of the logits tile; keeps row reads conflict-free
constexpr int kSimtDK = 32;             // D-chunk staged per step by the SIMT GEMM (fp32)
constexpr int kSimtLd = kSimtDK + 4;    // +4 floats: float4 reads of 8 consecutive rows hit distinct banks
constexpr int kMmaDK = 64;              // D-chunk staged per step by the tensor-core GEMM (16-bit)
constexpr int kMmaLd = kMmaDK + 8;      // +8 halves: 16-byte row skew for conflict-free fragment loads
constexpr int kSimtOpBytes = 2 * kRows * kSimtLd * 4;
constexpr int kMmaOpBytes = 2 * kRows * kMmaLd * 2;
constexpr int kOpBytes = kSimtOpBytes > kMmaOpBytes ? kSimtOpBytes : kMmaOpBytes;
constexpr int kSmemAlign = 128;
static_assert(kThreads == 256 && kRows == 64 && kKeys == 64, "thread mappings below assume 256 threads, 64x64");
static_assert(kOpBytes % kSmemAlign == 0, "operand staging must keep the next buffer aligned");

// Everything a block needs to locate its rows and keys (passed by value).
struct Geometry {
  int64_t N;            // key slots per kv head
  int Q, D, G, Hkv;
  int R;                // G * Q rows per kv head
  int rows_per_block;   // rows of a block's row group (a run of the kv head's G * Q rows)
  int rows_alloc;       // rows_per_block rounded up to kRows (rows of the logits tile)
  int num_tiles;        // ceil(N / kKeys)
  int tiles_per_split;  // pass 1: key tiles per block
  int num_splits;       // pass 1: blocks along the keys
  float scale;
  float softcap;        // 0: none
};

// Dynamic shared memory of one block: GEMM operand staging, the fp32 logits tile of the row group,
// the key positions of the tile and per-row data. All in one buffer aligned by hand to 128 bytes (the
// WMMA loads/stores need 32-byte alignment, which the extern declaration alone does not promise).
struct Smem {
  unsigned char* ops;  // kOpBytes: operand staging of tile_dots_*
  float* tile;         // [rows_alloc][kLdS] logits (then probabilities in pass 2)
  int64_t* kpos;       // [kKeys] positions of the tile's keys (-1 past N)
  int64_t* qpos;       // [rows_alloc] position of each row's query
  float* ra;           // [rows_alloc] pass 1: running max;  pass 2: row max
  float* rb;           // [rows_alloc] pass 1: running sum;  pass 2: 1 / row sum
};

__host__ __device__ constexpr int64_t smem_bytes(int rows_alloc) {
  return kSmemAlign + kOpBytes + int64_t(rows_alloc) * kLdS * 4 + kKeys * 8 + int64_t(rows_alloc) * (8 + 4 + 4);
}

__device__ __forceinline__ Smem carve_smem(int rows_alloc) {
  extern __shared__ unsigned char smem_raw[];
  // Offset from smem_raw itself (not an integer round trip) so the compiler keeps shared-memory accesses.
  const unsigned misalign = unsigned(reinterpret_cast<uintptr_t>(smem_raw) % kSmemAlign);
  Smem s;
  s.ops = smem_raw + (misalign ? kSmemAlign - misalign : 0u);
  s.tile = reinterpret_cast<float*>(s.ops + kOpBytes);
  s.kpos = reinterpret_cast<int64_t*>(s.tile + rows_alloc * kLdS);
  s.qpos = s.kpos + kKeys;
  s.ra = reinterpret_cast<float*>(s.qpos + rows_alloc);
  s.rb = s.ra + rows_alloc;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Logit tiles: out[r][j] = q_r . k_j for r < 64 rows and j < 64 keys (rows >= nrows / keys >= nkeys get
// zeros from zero-padded operands; callers ignore them). Per D-chunk both routines stage operands, sync,
// compute, sync, so the staging buffer is free again on return; `out` is written last and may be read
// only after the caller's next __syncthreads.

// SIMT: 16x16 threads, each a 4x4 register tile (rows ty + 16a, keys tx + 16b), fp32 FMAs.
template <typename scalar_t>
__device__ __forceinline__ void tile_dots_simt(const scalar_t* __restrict__ q, int nrows,
                                               const scalar_t* __restrict__ k, int nkeys, int D,
                                               unsigned char* ops, float* __restrict__ out) {
  float(*sq)[kSimtLd] = reinterpret_cast<float(*)[kSimtLd]>(ops);
  float(*sk)[kSimtLd] = sq + kRows;
  const int t = threadIdx.x, ty = t / 16, tx = t % 16, c = t % 32;
  float acc[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;

  for (int d0 = 0; d0 < D; d0 += kSimtDK) {
    // Stage a [64 x 32] chunk of rows and keys as fp32: a warp reads 32 consecutive elements of one row.
    const bool col_ok = d0 + c < D;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int r = t / 32 + 8 * e;
      sq[r][c] = (col_ok && r < nrows) ? static_cast<float>(q[int64_t(r) * D + d0 + c]) : 0.f;
      sk[r][c] = (col_ok && r < nkeys) ? static_cast<float>(k[int64_t(r) * D + d0 + c]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSimtDK; kk += 4) {
      float4 qa[4], kb[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) qa[a] = *reinterpret_cast<const float4*>(&sq[ty + 16 * a][kk]);
#pragma unroll
      for (int b = 0; b < 4; ++b) kb[b] = *reinterpret_cast<const float4*>(&sk[tx + 16 * b][kk]);
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          acc[a][b] = fmaf(qa[a].x, kb[b].x, acc[a][b]);
          acc[a][b] = fmaf(qa[a].y, kb[b].y, acc[a][b]);
          acc[a][b] = fmaf(qa[a].z, kb[b].z, acc[a][b]);
          acc[a][b] = fmaf(qa[a].w, kb[b].w, acc[a][b]);
        }
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) out[(ty + 16 * a) * kLdS + tx + 16 * b] = acc[a][b];
}

template <typename scalar_t>
struct MmaElem;
template <>
struct MmaElem<at::Half> {
  using type = __half;
};
template <>
struct MmaElem<at::BFloat16> {
  using type = __nv_bfloat16;
};

// Tensor cores: warp w owns the 16x32 output strip rows 16*(w/2), keys 32*(w%2) (two 16x16 fragments).
// Needs D % 8 == 0 and 16-byte aligned q/k (16-byte vector loads); D is zero-padded to kMmaDK chunks.
template <typename scalar_t>
__device__ __forceinline__ void tile_dots_mma(const scalar_t* __restrict__ q, int nrows,
                                              const scalar_t* __restrict__ k, int nkeys, int D,
                                              unsigned char* ops, float* __restrict__ out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using elem_t = typename MmaElem<scalar_t>::type;
  elem_t* sq = reinterpret_cast<elem_t*>(ops);  // [kRows][kMmaLd], row-major rows x d
  elem_t* sk = sq + kRows * kMmaLd;             // [kKeys][kMmaLd]: read as the col-major d x keys operand
  const int t = threadIdx.x, warp = t / 32;
  const int wr = warp / 2, wc = (warp % 2) * 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.f);
  wmma::fill_fragment(acc[1], 0.f);

  for (int d0 = 0; d0 < D; d0 += kMmaDK) {
    // Stage [64 x 64] chunks as raw 16-byte vectors: 8 threads cover 128 contiguous bytes of a row.
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int r = t / 8 + 32 * e, c = (t % 8) * 8;
      uint4 vq = make_uint4(0u, 0u, 0u, 0u), vk = vq;
      if (d0 + c < D) {
        if (r < nrows) vq = *reinterpret_cast<const uint4*>(q + int64_t(r) * D + d0 + c);
        if (r < nkeys) vk = *reinterpret_cast<const uint4*>(k + int64_t(r) * D + d0 + c);
      }
      *reinterpret_cast<uint4*>(sq + r * kMmaLd + c) = vq;
      *reinterpret_cast<uint4*>(sk + r * kMmaLd + c) = vk;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kMmaDK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, elem_t, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, sq + wr * 16 * kMmaLd + kk, kMmaLd);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, elem_t, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, sk + (wc + f) * 16 * kMmaLd + kk, kMmaLd);
        wmma::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int f = 0; f < 2; ++f)
    wmma::store_matrix_sync(out + wr * 16 * kLdS + (wc + f) * 16, acc[f], kLdS, wmma::mem_row_major);
#else
  __trap();  // the host only picks this path on sm_80+
#endif
}

template <typename scalar_t, bool kMma>
__device__ __forceinline__ void tile_dots(const scalar_t* q, int nrows, const scalar_t* k, int nkeys, int D,
                                          unsigned char* ops, float* out) {
  if constexpr (kMma)
    tile_dots_mma<scalar_t>(q, nrows, k, nkeys, D, ops, out);
  else
    tile_dots_simt<scalar_t>(q, nrows, k, nkeys, D, ops, out);
}

// Logits of a row group against one key tile: 64-row sub-tiles stacked into s.tile.
template <typename scalar_t, bool kMma>
__device__ __forceinline__ void group_logits(const scalar_t* q_rows, int rows, const scalar_t* k_tile, int nkeys,
                                             int D, const Smem& s) {
  for (int r0 = 0; r0 < rows; r0 += kRows)
    tile_dots<scalar_t, kMma>(q_rows + int64_t(r0) * D, min(kRows, rows - r0), k_tile, nkeys, D, s.ops,
                              s.tile + r0 * kLdS);
}

// attention_logit (logits.cuh) rounds dot * scale once (as the CPU kernel's matmul(...).mul_(scale)): __fmul_rn
// keeps the compiler from contracting it into an FMA with the following subtraction, so both passes see one value.

// Merges softmax statistics (m2, l2) into (m, l); m = -inf with l = 0 means "no visible key yet".
__device__ __forceinline__ void merge_softmax(float& m, float& l, float m2, float l2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;
  l = l * expf(m - mn) + l2 * expf(m2 - mn);
  m = mn;
}

// Sum over the P (power of two) adjacent lanes named by mask.
__device__ __forceinline__ float group_sum(float v, unsigned mask, int P) {
  for (int off = P / 2; off > 0; off /= 2) v += __shfl_xor_sync(mask, v, off);
  return v;
}

// Block coordinates shared by both passes.
struct BlockRows {
  int b, rows;
  int r0;        // first row of the group among its kv head's R rows
  int64_t row0;  // first row of the group in the [B * Hkv * R] row numbering
};

__device__ __forceinline__ BlockRows block_rows(const Geometry& geo) {
  BlockRows br;
  const int bg = blockIdx.z;
  br.b = bg / geo.Hkv;
  br.r0 = blockIdx.y * geo.rows_per_block;
  br.rows = min(geo.rows_per_block, geo.R - br.r0);
  br.row0 = int64_t(bg) * geo.R + br.r0;
  return br;
}

// Position of the query of row r of the block (row r0 + r of its kv head: query (r0 + r) % Q).
__device__ __forceinline__ int64_t row_query_pos(const int64_t* q_pos, const Geometry& geo, const BlockRows& br,
                                                 int r) {
  return q_pos[int64_t(br.b) * geo.Q + (br.r0 + r) % geo.Q];
}

// Loads the positions of the key tile starting at j0 (-1 past N: invisible to every query).
__device__ __forceinline__ void load_kpos(const int64_t* kpos_head, int64_t j0, int nkeys, const Smem& s) {
  const int t = threadIdx.x;
  if (t < kKeys) s.kpos[t] = t < nkeys ? kpos_head[j0 + t] : -1;
}

// Pass 2's start: the rows' positions and softmax statistics (ra = row max, rb = 1 / row sum) and the logits of
// the block's rows against the key tile at j0, in shared memory and visible to every thread on return.
template <typename scalar_t, bool kMma>
__device__ __forceinline__ void normalised_logits(const scalar_t* q, const scalar_t* k, const int64_t* q_pos,
                                                  const int64_t* k_pos, const float2* stats, const Geometry& geo,
                                                  const BlockRows& br, int64_t j0, int nkeys, const Smem& s) {
  for (int r = threadIdx.x; r < br.rows; r += kThreads) {
    const float2 st = stats[br.row0 + r];
    s.qpos[r] = row_query_pos(q_pos, geo, br, r);
    s.ra[r] = st.x;
    s.rb[r] = st.y;
  }
  load_kpos(k_pos + int64_t(blockIdx.z) * geo.N, j0, nkeys, s);
  group_logits<scalar_t, kMma>(q + br.row0 * geo.D, br.rows, k + (int64_t(blockIdx.z) * geo.N + j0) * geo.D, nkeys,
                               geo.D, s);
  __syncthreads();
}

// The probability of key j of the tile for row r, after normalised_logits (0 where the row does not see it).
__device__ __forceinline__ float tile_probability(const Smem& s, const Geometry& geo, int r, int j) {
  const int64_t kp = s.kpos[j];
  const bool visible = kp >= 0 && kp <= s.qpos[r];
  return visible ? expf(attention_logit(s.tile[r * kLdS + j], geo.scale, geo.softcap) - s.ra[r]) * s.rb[r] : 0.f;
}

// ---------------------------------------------------------------------------------------------
// Pass 1: per-row running (max, sum exp) over a contiguous run of key tiles.
template <typename scalar_t, bool kMma>
__global__ void __launch_bounds__(kThreads) softmax_partials_kernel(const scalar_t* __restrict__ q,
                                                                    const scalar_t* __restrict__ k,
                                                                    const int64_t* __restrict__ q_pos,
                                                                    const int64_t* __restrict__ k_pos, Geometry geo,
                                                                    float2* __restrict__ partials) {
  const Smem s = carve_smem(geo.rows_alloc);
  const BlockRows br = block_rows(geo);
  const int t = threadIdx.x, split = blockIdx.x;
  const scalar_t* q_rows = q + br.row0 * geo.D;
  const scalar_t* k_head = k + int64_t(blockIdx.z) * geo.N * geo.D;
  const int64_t* kpos_head = k_pos + int64_t(blockIdx.z) * geo.N;

  // Made visible by the __syncthreads inside the first group_logits.
  for (int r = t; r < br.rows; r += kThreads) {
    s.qpos[r] = row_query_pos(q_pos, geo, br, r);
    s.ra[r] = -INFINITY;
    s.rb[r] = 0.f;
  }

  // Row statistics use 8 lanes per row (8 keys each); the shuffle mask names exactly those 8 lanes, which
  // always take the same branches.
  const int lane8 = t % 8;
  const unsigned mask8 = 0xffu << ((t % 32) & ~7);
  const int tile_end = min(geo.num_tiles, (split + 1) * geo.tiles_per_split);
  for (int tile = split * geo.tiles_per_split; tile < tile_end; ++tile) {
    const int64_t j0 = int64_t(tile) * kKeys;
    const int nkeys = int(geo.N - j0 < kKeys ? geo.N - j0 : kKeys);
    load_kpos(kpos_head, j0, nkeys, s);
    group_logits<scalar_t, kMma>(q_rows, br.rows, k_head + j0 * geo.D, nkeys, geo.D, s);
    __syncthreads();

    for (int r = t / 8; r < br.rows; r += kThreads / 8) {
      const int64_t qp = s.qpos[r];
      float v[kKeys / 8];
      float m = -INFINITY;
#pragma unroll
      for (int c = 0; c < kKeys / 8; ++c) {
        const int j = lane8 + 8 * c;
        const int64_t kp = s.kpos[j];
        v[c] = (kp >= 0 && kp <= qp) ? attention_logit(s.tile[r * kLdS + j], geo.scale, geo.softcap) : -INFINITY;
        m = fmaxf(m, v[c]);
      }
      for (int off = 4; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(mask8, m, off));
      float l = 0.f;
      if (m != -INFINITY) {  // uniform over the 8 lanes; invisible keys add expf(-inf) = 0
#pragma unroll
        for (int c = 0; c < kKeys / 8; ++c) l += expf(v[c] - m);
      }
      l = group_sum(l, mask8, 8);
      if (lane8 == 0) merge_softmax(s.ra[r], s.rb[r], m, l);
    }
    __syncthreads();  // before the next tile overwrites kpos and the logits
  }

  for (int r = t; r < br.rows; r += kThreads)
    partials[(br.row0 + r) * geo.num_splits + split] = make_float2(s.ra[r], s.rb[r]);
}

// Merges the splits of each row into (max, 1 / sum): max 0 and 1/sum 0 when the row sees no key, which
// makes every probability of that row 0 (as on the CPU).
__global__ void softmax_combine_kernel(const float2* __restrict__ partials, int64_t total_rows, int num_splits,
                                       float2* __restrict__ stats) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= total_rows) return;
  float m = -INFINITY, l = 0.f;
  for (int sp = 0; sp < num_splits; ++sp) {
    const float2 p = partials[r * num_splits + sp];
    merge_softmax(m, l, p.x, p.y);
  }
  stats[r] = make_float2(m == -INFINITY ? 0.f : m, l > 0.f ? 1.f / l : 0.f);
}

bool force_simt() {
  const char* e = std::getenv("CAKEKV_WINDOW_STATS_SIMT");
  return e != nullptr && e[0] != '\0' && e[0] != '0';
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

// Whether fp16/bf16 q and k take the tensor-core GEMM (see tile_dots_mma).
bool use_tensor_cores(const at::Tensor& q, const at::Tensor& k) {
  const bool half_type = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  return half_type && q.size(3) % 8 == 0 && aligned16(q) && aligned16(k) &&
         at::cuda::getCurrentDeviceProperties()->major >= 8 && !force_simt();
}

// Opts `kernel` in to more than the default 48 KiB of dynamic shared memory when it needs it.
template <typename Kernel>
void allow_smem(Kernel kernel, int64_t smem) {
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
}

// Pass 1's split of the keys: about 8 blocks per SM, each split a contiguous run of tiles.
void split_keys(Geometry& geo, int64_t blocks_per_split) {
  const int64_t target_blocks = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const int64_t splits =
      std::clamp<int64_t>((target_blocks + blocks_per_split - 1) / blocks_per_split, 1, geo.num_tiles);
  geo.tiles_per_split = int((geo.num_tiles + splits - 1) / splits);
  geo.num_splits = int((geo.num_tiles + geo.tiles_per_split - 1) / geo.tiles_per_split);
}

// Pass 1 and the combine: (row max, 1 / row sum) of every row, float2 [BG * R] in `stats` (fp32 [BG * R, 2]).
template <typename scalar_t, bool kMma>
void softmax_stats(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_pos, const at::Tensor& k_pos,
                   const Geometry& geo, int64_t BG, int num_groups, at::Tensor& stats) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t smem = smem_bytes(geo.rows_alloc);
  auto pass1 = softmax_partials_kernel<scalar_t, kMma>;
  allow_smem(pass1, smem);
  auto partials = at::empty({BG * geo.R * geo.num_splits, 2}, q.options().dtype(at::kFloat));
  auto* part = reinterpret_cast<float2*>(partials.mutable_data_ptr<float>());
  pass1<<<dim3(geo.num_splits, num_groups, BG), kThreads, smem, stream>>>(
      q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), q_pos.const_data_ptr<int64_t>(),
      k_pos.const_data_ptr<int64_t>(), geo, part);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t total_rows = BG * geo.R;
  softmax_combine_kernel<<<unsigned((total_rows + 255) / 256), 256, 0, stream>>>(
      part, total_rows, geo.num_splits, reinterpret_cast<float2*>(stats.mutable_data_ptr<float>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A launch's geometry: row groups of rows_per_block rows, key tiles, pass 1's key splits.
struct TilePlan {
  Geometry geo;
  int num_groups;  // row groups per kv head (grid y)
};

TilePlan plan_tiles(const char* op, const at::Tensor& q, const at::Tensor& k, int64_t rows_per_block, double scale,
                    double softcap) {
  const int64_t B = q.size(0), Q = q.size(2), D = q.size(3), Hkv = k.size(1), G = q.size(1) / Hkv;
  const int64_t BG = B * Hkv;
  TORCH_CHECK(BG <= 65535, op, " (CUDA): B * Hkv = ", BG, " exceeds the grid limit 65535");
  TORCH_CHECK(G * Q <= (int64_t(1) << 30) && D <= (int64_t(1) << 30), op, " (CUDA): sizes too large");
  TilePlan plan{};
  Geometry& geo = plan.geo;
  geo.N = k.size(2);
  geo.Q = int(Q);
  geo.D = int(D);
  geo.G = int(G);
  geo.Hkv = int(Hkv);
  geo.R = int(G * Q);
  geo.rows_per_block = int(rows_per_block);
  geo.rows_alloc = int((rows_per_block + kRows - 1) / kRows * kRows);
  geo.num_tiles = int((geo.N + kKeys - 1) / kKeys);
  geo.scale = float(scale);
  geo.softcap = float(softcap);
  plan.num_groups = int((geo.R + rows_per_block - 1) / rows_per_block);
  TORCH_CHECK(plan.num_groups <= 65535, op, " (CUDA): too many query rows per kv head (", geo.R, ")");
  const int64_t smem = smem_bytes(geo.rows_alloc), optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(smem <= optin, op, " (CUDA): a row group of ", rows_per_block, " query rows needs ", smem,
              " bytes of shared memory per block, more than the device's ", optin);
  split_keys(geo, BG * plan.num_groups);
  return plan;
}

// Calls f.template operator()<scalar_t, kMma>() for q's dtype and the GEMM routine it takes.
template <typename F>
void with_tile_gemm(const at::Tensor& q, const at::Tensor& k, F&& f) {
  const bool mma = use_tensor_cores(q, k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cakekv_attention_tiles", [&] {
    if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
      if (mma) return f.template operator()<scalar_t, true>();
    }
    f.template operator()<scalar_t, false>();
  });
}

}  // namespace

}  // namespace cakekv::cuda
