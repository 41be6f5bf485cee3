// TqtFakeQuantGrad: the backward pass of TQT fake quantization in one pass over the tensor (CPU).
//
// quant.py's fused path computes the forward with TF's QuantizeAndDequantizeV4 kernel and, without
// this op, its backward with five elementwise passes (two QuantizeAndDequantizeV4Grad, a Sub, a
// Mul and a Sum). This kernel reads dy, x and y once and writes dx once:
//
//     inside = lo <= x <= hi                      (lo = n s, hi = p s)
//     dx     = dy 1[inside]                       dL/dx, straight through inside the range
//     sum    = sum(dy (y - 1[inside] x))          dL/dlog2_t = ln2 sum   (docs/tqt.md)
//
// y - x is exact inside the range (y = R(x/s) s lies within s/2 of x), so each term is one rounded
// product, as in the reference; only the order of the sum differs (float partial sums in vector
// lanes over 4096 elements, added up in double), so dL/dlog2_t equals the reference to float
// rounding, not bit for bit. Built by `make kernel` against the installed TensorFlow.

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;

constexpr int64_t kChunk = 4096;  // elements summed in float before the double accumulator
constexpr int64_t kMinBlock = 1 << 15;  // below this many elements per thread, fewer threads

// dx and the chunk's sum; branch-free so that it vectorizes (built with -fno-trapping-math).
template <typename T>
double GradChunk(const T* dy, const T* __restrict__ x, const T* __restrict__ y, T* dx, int64_t n, T lo,
                 T hi) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const T xi = x[i], dyi = dy[i];
    const bool inside = (xi >= lo) & (xi <= hi);
    const T mask = inside ? T(1) : T(0);
    dx[i] = dyi * mask;  // a product, as TF's mask: -0 where a negative dy is clipped
    sum += dyi * (y[i] - (inside ? xi : T(0)));
  }
  return sum;
}

template <typename T>
class TqtFakeQuantGradOp : public OpKernel {
 public:
  explicit TqtFakeQuantGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    const Tensor& y = ctx->input(2);
    OP_REQUIRES(ctx, dy.shape() == x.shape() && y.shape() == x.shape(),
                absl::InvalidArgumentError("TqtFakeQuantGrad: dy, x and y must have one shape"));
    OP_REQUIRES(ctx, ctx->input(3).dims() == 0 && ctx->input(4).dims() == 0,
                absl::InvalidArgumentError("TqtFakeQuantGrad: lo and hi must be scalars"));
    const T lo = ctx->input(3).scalar<T>()();
    const T hi = ctx->input(4).scalar<T>()();
    Tensor* dx = nullptr;
    Tensor* sum = nullptr;
    // dx overwrites dy where TF lets it (dy read once, then dead): no new buffer to fault in
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x.shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({}), &sum));
    const T* pdy = dy.flat<T>().data();
    const T* px = x.flat<T>().data();
    const T* py = y.flat<T>().data();
    T* pdx = dx->flat<T>().data();
    const int64_t n = x.NumElements();

    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(pool->NumThreads(), n / kMinBlock));
    std::vector<double> partial(blocks, 0.0);  // one per block: the sum does not depend on timing
    auto block_sums = [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t stop = n * (b + 1) / blocks;
        for (int64_t c = n * b / blocks; c < stop; c += kChunk) {
          const int64_t len = std::min(stop - c, kChunk);
          partial[b] += GradChunk(pdy + c, px + c, py + c, pdx + c, len, lo, hi);
        }
      }
    };
    if (blocks == 1) {
      block_sums(0, 1);  // a small tensor: no hand-off to the pool
    } else {
      pool->ParallelFor(blocks,
                        tsl::thread::ThreadPool::SchedulingParams(
                            tsl::thread::ThreadPool::SchedulingStrategy::kFixedBlockSize, std::nullopt, 1),
                        block_sums);
    }
    double total = 0.0;
    for (double p : partial) total += p;
    sum->scalar<T>()() = static_cast<T>(total);
  }
};

}  // namespace

REGISTER_OP("TqtFakeQuantGrad")
    .Input("dy: T")
    .Input("x: T")
    .Input("y: T")
    .Input("lo: T")
    .Input("hi: T")
    .Output("dx: T")
    .Output("sum: T")
    .Attr("T: {float, double}")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(1));
      c->set_output(1, c->Scalar());
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("TqtFakeQuantGrad").Device(tensorflow::DEVICE_CPU).TypeConstraint<float>("T"),
                        TqtFakeQuantGradOp<float>);
REGISTER_KERNEL_BUILDER(Name("TqtFakeQuantGrad").Device(tensorflow::DEVICE_CPU).TypeConstraint<double>("T"),
                        TqtFakeQuantGradOp<double>);
