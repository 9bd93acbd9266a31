// Native post-processing for cellsam-trt (see postprocess.hpp).
//
// Exactness: the label maps are those of the reference arithmetic (tests/reference_postprocess.py):
// per stage a width pass then a height pass, value = (1 - w) * a + w * b with each product and
// the sum rounded to float32. Where a value is computed that way (exact(), exact_at(),
// upsample_logits) it uses the same float32 operations in the same order; setup.py compiles
// with -ffp-contract=off so that no compiler fuses them into an FMA. Each value depends only on
// its own taps, so computing it on a smaller region than the reference does not change it. The
// fast path (Upsampler::fast) decides only pixels that an error bound proves it decides alike.

#include "postprocess.hpp"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#if defined(__SSE2__) || defined(_M_X64) || defined(_M_AMD64)
#define CELLSAM_SSE2 1
#include <emmintrin.h>
#endif

namespace cellsam {

float mask_logit_threshold() {
    // the smallest float32 x whose sigmoid, rounded to the nearest float32, is > 0.4f: the
    // official float32 test `sigmoid(x) > 0.4` with a correctly rounded sigmoid (evaluated in
    // float64, whose error is far below the float32 spacing here)
    auto on = [](float x) {
        return static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(x)))) > 0.4f;
    };
    float t = static_cast<float>(std::log(2.0 / 3.0));
    while (!on(t)) t = std::nextafter(t, 1.0f);
    while (on(std::nextafter(t, -1.0f))) t = std::nextafter(t, -1.0f);
    return t;
}

Taps make_taps(int n_in, int n_out) {
    Taps t;
    t.n_in = n_in;
    t.n_out = n_out;
    t.lo.resize(n_out);
    t.hi.resize(n_out);
    t.w.resize(n_out);
    t.w1.resize(n_out);
    if (n_out > 0) {
        const float scale = static_cast<float>(n_in) / static_cast<float>(n_out);
        for (int i = 0; i < n_out; ++i) {
            const float half = static_cast<float>(i) + 0.5f;
            const float scaled = scale * half;
            float src = scaled - 0.5f;
            if (!(src > 0.0f)) src = 0.0f;
            const int lo = std::min(static_cast<int>(src), n_in - 1);
            t.lo[i] = lo;
            t.hi[i] = std::min(lo + 1, n_in - 1);
            t.w[i] = src - static_cast<float>(lo);  // exact (Sterbenz), as in float64
            t.w1[i] = 1.0f - t.w[i];
        }
    }
    t.first_out.assign(n_in, n_out);
    t.last_out.assign(n_in, -1);
    int o = 0;
    for (int i = 0; i < n_in; ++i) {
        while (o < n_out && t.hi[o] < i) ++o;
        t.first_out[i] = o;
    }
    o = n_out - 1;
    for (int i = n_in - 1; i >= 0; --i) {
        while (o >= 0 && t.lo[o] > i) --o;
        t.last_out[i] = o;
    }
    return t;
}

namespace {

// A closed index interval [a, b]; empty when a > b.
struct Span {
    int32_t a = INT32_MAX, b = INT32_MIN;
    bool empty() const { return a > b; }
    void add(const Span& o) {
        if (o.empty()) return;
        a = std::min(a, o.a);
        b = std::max(b, o.b);
    }
};

// outputs of t whose taps touch the inputs s
inline Span forward(const Taps& t, const Span& s) {
    if (s.empty()) return {};
    Span r{t.first_out[s.a], t.last_out[s.b]};
    return r.empty() ? Span{} : r;
}

// out[x] = (1 - w[x]) * in[lo[x]] + w[x] * in[hi[x]] for x in s (gathering pass along a row)
inline void resample_row(const float* in, const Taps& t, const Span& s, float* out) {
    const int32_t* lo = t.lo.data();
    const int32_t* hi = t.hi.data();
    const float* w = t.w.data();
    const float* w1 = t.w1.data();
    for (int32_t x = s.a; x <= s.b; ++x) {
        const float p = w1[x] * in[lo[x]];
        const float q = w[x] * in[hi[x]];
        out[x] = p + q;
    }
}

// out[x] = w1 * a[x] + w * b[x] for x in s (pass across rows)
inline void blend_rows(const float* a, const float* b, float w1, float w, const Span& s, float* out) {
    for (int32_t x = s.a; x <= s.b; ++x) {
        const float p = w1 * a[x];
        const float q = w * b[x];
        out[x] = p + q;
    }
}

inline float lerp(float w1, float a, float w, float b) {
    const float p = w1 * a;
    const float q = w * b;
    return p + q;
}

// The two stages along one axis composed: output o = sum_j c_j[o] * in[i_j[o]], j < 3, over the
// low-res input (the real-number value of the pipeline with its float32 weights). Absent taps
// point at a present one with coefficient 0.
struct Composed {
    std::vector<int32_t> i0, i1, i2;
    std::vector<float> c0, c1, c2;
};

Composed compose(const Taps& t1, const Taps& t2) {
    Composed c;
    const int n = t2.n_out;
    c.i0.resize(n), c.i1.resize(n), c.i2.resize(n), c.c0.resize(n), c.c1.resize(n), c.c2.resize(n);
    for (int o = 0; o < n; ++o) {
        const int l = t2.lo[o], h = t2.hi[o];
        const int base = t1.lo[l];
        double k[3] = {0.0, 0.0, 0.0};  // products of two floats are exact in double
        k[t1.lo[l] - base] += static_cast<double>(t2.w1[o]) * t1.w1[l];
        k[t1.hi[l] - base] += static_cast<double>(t2.w1[o]) * t1.w[l];
        k[t1.lo[h] - base] += static_cast<double>(t2.w[o]) * t1.w1[h];
        k[t1.hi[h] - base] += static_cast<double>(t2.w[o]) * t1.w[h];
        const int last = t1.n_in - 1;
        c.i0[o] = base;
        c.i1[o] = std::min(base + 1, last);
        c.i2[o] = std::min(base + 2, last);
        c.c0[o] = static_cast<float>(k[0]);
        c.c1[o] = static_cast<float>(k[1]);
        c.c2[o] = static_cast<float>(k[2]);
    }
    return c;
}

// Bilinear 256 -> 1024 -> (height, width) of one mask, computed only where the mask can be on.
//
// Where: bilinear interpolation is a convex combination, so an output can only clear the
// threshold if one of the low-res logits it depends on does ("hot": > threshold - 1e-3, a margin
// far above float32 rounding). Per row, the hot columns are bounded by a span; spans are pushed
// forward through the four passes (low-res -> stage-1 width pass -> stage-1 height pass -> final
// width pass -> final height pass) to give, for each final row, the span of columns that can be
// on (plan()).
//
// How, exactly (exact()): the four passes in the reference's float32 arithmetic; the spans are
// pulled backward to find what each intermediate row must provide, and only that is computed.
//
// How, fast (fast()): the two stages composed into one separable filter of at most 3 x 3
// low-res taps, evaluated in float32 in another order. Its result differs from the exact one
// by at most ~20 u A (u = 2**-24, A = the largest |logit| of the mask; rounding error analysis
// of both: 4 lerps of 3 roundings each, and two 3-term dot products with rounded coefficients),
// so wherever it is farther than B = 64 u (A + 1) from the threshold it decides on/off exactly
// as the exact arithmetic would; the few pixels within B are recomputed with exact_at(). Masks
// with a non-finite or huge (> 1e30) logit take exact() instead.
class Upsampler {
   public:
    // Computes the final rows [row_begin, row_end) only (a band; the whole image by default).
    Upsampler(int height, int width, int row_begin = 0, int row_end = INT_MAX)
        : H_(height),
          band0_(std::max(0, row_begin)),
          band1_(std::min(height, row_end) - 1),
          W_(width),
          t1_(make_taps(kLowRes, kModelSize)),
          ty_(make_taps(kModelSize, height)),
          tx_(make_taps(kModelSize, width)),
          cy_(compose(t1_, ty_)),
          cx_(compose(t1_, tx_)),
          hot_(kLowRes),
          hot_v_(kLowRes),
          need_v_(kLowRes),
          hot_s_(kModelSize),
          need_s_(kModelSize),
          need_u_(kModelSize),
          hot_f_(height),
          need_h_(kLowRes) {}

    // Finds the final rows y0..y1 and per-row column spans hot_f_ where the mask can be on; false
    // when it is nowhere. full: every pixel. Also records the largest |logit| (as float bits).
    bool plan(const float* logits, float hot_threshold, bool full) {
        if (H_ == 0 || W_ == 0) return false;
        int rmin = INT_MAX, rmax = -1;
        int32_t max_bits = 0;
        for (int r = 0; r < kLowRes; ++r) {
            Span h;
            if (full) {
                h = Span{0, kLowRes - 1};
            } else {
                const float* row = logits + static_cast<size_t>(r) * kLowRes;
                unsigned any = 0;
                int32_t mb = 0;
                for (int c = 0; c < kLowRes; ++c) {
                    any |= static_cast<unsigned>(row[c] > hot_threshold);
                    int32_t bits;
                    std::memcpy(&bits, row + c, sizeof bits);
                    bits &= 0x7fffffff;  // |x| as an integer: ordered like |x|, NaN/inf above all finite
                    mb = mb > bits ? mb : bits;
                }
                max_bits = std::max(max_bits, mb);
                if (any) {
                    int c0 = 0, c1 = kLowRes - 1;
                    while (!(row[c0] > hot_threshold)) ++c0;
                    while (!(row[c1] > hot_threshold)) --c1;
                    h = Span{c0, c1};
                }
            }
            hot_[r] = h;
            if (!h.empty()) {
                rmin = std::min(rmin, r);
                rmax = r;
            }
        }
        max_abs_bits_ = max_bits;
        if (rmax < 0) return false;
        // forward: stage-1 rows R0..R1 that can be hot, and their final-column spans
        R0_ = t1_.first_out[rmin], R1_ = t1_.last_out[rmax];
        if (R0_ > R1_) return false;
        for (int r = rmin; r <= rmax; ++r) hot_v_[r] = forward(t1_, hot_[r]);
        auto hot_v = [&](int r) { return (r < rmin || r > rmax) ? Span{} : hot_v_[r]; };
        for (int R = R0_; R <= R1_; ++R) {
            Span u = hot_v(t1_.lo[R]);
            u.add(hot_v(t1_.hi[R]));
            hot_s_[R] = forward(tx_, u);
        }
        y0_ = std::max(ty_.first_out[R0_], band0_), y1_ = std::min(ty_.last_out[R1_], band1_);
        if (y0_ > y1_) return false;
        bool any = false;
        for (int y = y0_; y <= y1_; ++y) {
            Span f = hot_s(ty_.lo[y]);
            f.add(hot_s(ty_.hi[y]));
            hot_f_[y] = f;
            any = any || !f.empty();
        }
        return any;
    }

    // The largest |logit| of the planned mask; +inf for NaN/inf (from plan(), not in full mode).
    float max_abs() const {
        if (max_abs_bits_ >= 0x7f800000) return INFINITY;
        float a;
        std::memcpy(&a, &max_abs_bits_, sizeof a);
        return a;
    }

    // sink(y, span, sa, sb, w1, w): final row y over span = w1 * sa[x] + w * sb[x]
    template <class Sink>
    void exact(const float* logits, Sink&& sink) {
        if (!v_) {  // not zeroed: every value is written before it is read
            v_.reset(new float[static_cast<size_t>(kLowRes) * kModelSize]);
            u_.reset(new float[static_cast<size_t>(kModelSize) * kModelSize]);
            s_.reset(new float[static_cast<size_t>(kModelSize) * W_]);
        }
        // backward: what each stage-1 row must provide to the final rows y0..y1
        const int S0 = ty_.lo[y0_], S1 = ty_.hi[y1_];
        for (int R = S0; R <= S1; ++R) need_s_[R] = Span{};
        for (int y = y0_; y <= y1_; ++y) {
            need_s_[ty_.lo[y]].add(hot_f_[y]);
            need_s_[ty_.hi[y]].add(hot_f_[y]);
        }
        const int V0 = t1_.lo[S0], V1 = t1_.hi[S1];
        for (int r = V0; r <= V1; ++r) need_v_[r] = Span{};
        for (int R = S0; R <= S1; ++R) {
            const Span& s = need_s_[R];
            need_u_[R] = s.empty() ? Span{} : Span{tx_.lo[s.a], tx_.hi[s.b]};
            need_v_[t1_.lo[R]].add(need_u_[R]);
            need_v_[t1_.hi[R]].add(need_u_[R]);
        }
        // compute: stage-1 width pass, stage-1 height pass + final width pass, final height pass
        for (int r = V0; r <= V1; ++r)
            if (!need_v_[r].empty())
                resample_row(logits + static_cast<size_t>(r) * kLowRes, t1_, need_v_[r], vrow(r));
        for (int R = S0; R <= S1; ++R) {
            if (need_s_[R].empty()) continue;
            blend_rows(vrow(t1_.lo[R]), vrow(t1_.hi[R]), t1_.w1[R], t1_.w[R], need_u_[R], urow(R));
            resample_row(urow(R), tx_, need_s_[R], srow(R));
        }
        for (int y = y0_; y <= y1_; ++y)
            if (!hot_f_[y].empty()) sink(y, hot_f_[y], srow(ty_.lo[y]), srow(ty_.hi[y]), ty_.w1[y], ty_.w[y]);
    }

    // One final pixel with the exact arithmetic of exact(), from the low-res logits.
    float exact_at(const float* logits, int y, int x) const {
        auto v = [&](int r, int C) {
            const float* row = logits + static_cast<size_t>(r) * kLowRes;
            return lerp(t1_.w1[C], row[t1_.lo[C]], t1_.w[C], row[t1_.hi[C]]);
        };
        auto u = [&](int R, int C) { return lerp(t1_.w1[R], v(t1_.lo[R], C), t1_.w[R], v(t1_.hi[R], C)); };
        auto s = [&](int R) { return lerp(tx_.w1[x], u(R, tx_.lo[x]), tx_.w[x], u(R, tx_.hi[x])); };
        return lerp(ty_.w1[y], s(ty_.lo[y]), ty_.w[y], s(ty_.hi[y]));
    }

    // Labels the planned mask's on pixels (logit >= thr) with `label`; needs finite logits with
    // |logit| <= 1e30 (see the class comment).
    void fast(const float* logits, float thr, int32_t label, int32_t* out) {
        if (!h_) {
            h_.reset(new float[static_cast<size_t>(kLowRes) * W_]);
            coef4_.assign(static_cast<size_t>(4) * W_, 0.0f);  // (c0, c1, c2, 0) per column
            for (int x = 0; x < W_; ++x) {
                coef4_[4 * x] = cx_.c0[x];
                coef4_[4 * x + 1] = cx_.c1[x];
                coef4_[4 * x + 2] = cx_.c2[x];
            }
        }
        const float bound = 64.0f * 0x1p-24f * (max_abs() + 1.0f);
        const float hi_t = thr + bound, lo_t = thr - bound;
        const int r0 = cy_.i0[y0_], r1 = cy_.i2[y1_];
        for (int r = r0; r <= r1; ++r) need_h_[r] = Span{};
        for (int y = y0_; y <= y1_; ++y) {
            need_h_[cy_.i0[y]].add(hot_f_[y]);
            need_h_[cy_.i1[y]].add(hot_f_[y]);
            need_h_[cy_.i2[y]].add(hot_f_[y]);
        }
        // column pass: a low-res row resampled to the final columns, computed when a final row
        // first needs it (rows are needed in increasing order, so they are still in cache). Taps
        // i0, i0 + 1, i0 + 2 of a row copied into a buffer padded with zeros (their coefficients
        // are 0 there).
        const int32_t* i0 = cx_.i0.data();
        const float *c0 = cx_.c0.data(), *c1 = cx_.c1.data(), *c2 = cx_.c2.data();
        float padded[kLowRes + 3];
        padded[kLowRes] = padded[kLowRes + 1] = padded[kLowRes + 2] = 0.0f;
        int next_row = r0;
        auto column_pass = [&](int r) {
            if (need_h_[r].empty()) return;
            const int32_t xa = need_h_[r].a, xb = need_h_[r].b;
            std::memcpy(padded, logits + static_cast<size_t>(r) * kLowRes, sizeof(float) * kLowRes);
            float* h = hrow(r);
            int32_t x = xa;
#if defined(CELLSAM_SSE2)
            // four columns at a time: (c0, c1, c2, 0) * (t[0], t[1], t[2], t[3]) per column, then a
            // transpose, so that h = (p + q) + s with the same float32 operations as the loop below
            const float* c4 = coef4_.data();
            for (; x + 3 <= xb; x += 4) {
                __m128 m0 = _mm_mul_ps(_mm_loadu_ps(c4 + 4 * x), _mm_loadu_ps(padded + i0[x]));
                __m128 m1 = _mm_mul_ps(_mm_loadu_ps(c4 + 4 * x + 4), _mm_loadu_ps(padded + i0[x + 1]));
                __m128 m2 = _mm_mul_ps(_mm_loadu_ps(c4 + 4 * x + 8), _mm_loadu_ps(padded + i0[x + 2]));
                __m128 m3 = _mm_mul_ps(_mm_loadu_ps(c4 + 4 * x + 12), _mm_loadu_ps(padded + i0[x + 3]));
                _MM_TRANSPOSE4_PS(m0, m1, m2, m3);  // m0 = p, m1 = q, m2 = s of x .. x + 3
                _mm_storeu_ps(h + x, _mm_add_ps(_mm_add_ps(m0, m1), m2));
            }
#endif
            for (; x <= xb; ++x) {
                const float* t = padded + i0[x];
                const float p = c0[x] * t[0];
                const float q = c1[x] * t[1];
                const float s = c2[x] * t[2];
                h[x] = (p + q) + s;
            }
        };
        // row pass and decision (spans copied to locals: the int32 stores to `out` could alias them)
        for (int y = y0_; y <= y1_; ++y) {
            if (hot_f_[y].empty()) continue;
            while (next_row <= cy_.i2[y]) column_pass(next_row++);
            const int32_t xa = hot_f_[y].a, n = hot_f_[y].b - xa + 1;
            const float* h0 = hrow(cy_.i0[y]) + xa;
            const float* h1 = hrow(cy_.i1[y]) + xa;
            const float* h2 = hrow(cy_.i2[y]) + xa;
            const float a0 = cy_.c0[y], a1 = cy_.c1[y], a2 = cy_.c2[y];
            int32_t* o = out + static_cast<int64_t>(y) * W_ + xa;
            unsigned unsure = 0;
            for (int32_t i = 0; i < n; ++i) {
                const float p = a0 * h0[i];
                const float q = a1 * h1[i];
                const float s = a2 * h2[i];
                const float f = (p + q) + s;
                o[i] = f >= hi_t ? label : o[i];
                unsure |= static_cast<unsigned>(f >= lo_t) & static_cast<unsigned>(f < hi_t);
            }
            if (!unsure) continue;
            for (int32_t i = 0; i < n; ++i) {  // the same float operations as above
                const float p = a0 * h0[i];
                const float q = a1 * h1[i];
                const float s = a2 * h2[i];
                const float f = (p + q) + s;
                if (f >= lo_t && f < hi_t && exact_at(logits, y, xa + i) >= thr) o[i] = label;
            }
        }
    }

   private:
    Span hot_s(int R) const { return (R < R0_ || R > R1_) ? Span{} : hot_s_[R]; }
    float* vrow(int r) { return v_.get() + static_cast<size_t>(r) * kModelSize; }
    float* urow(int R) { return u_.get() + static_cast<size_t>(R) * kModelSize; }
    float* srow(int R) { return s_.get() + static_cast<size_t>(R) * W_; }
    float* hrow(int r) { return h_.get() + static_cast<size_t>(r) * W_; }

    int H_, band0_, band1_, W_;
    Taps t1_, ty_, tx_;
    Composed cy_, cx_;
    std::vector<Span> hot_, hot_v_, need_v_, hot_s_, need_s_, need_u_, hot_f_, need_h_;
    int R0_ = 0, R1_ = -1, y0_ = 0, y1_ = -1;
    int32_t max_abs_bits_ = 0;
    std::vector<float> coef4_;
    std::unique_ptr<float[]> v_, u_, s_, h_;
};

}  // namespace

void assemble_labels(const float* lowres, int64_t n, int height, int width, int32_t* out, int threads) {
    if (n <= 0 || height <= 0 || width <= 0) return;
    if (n > INT32_MAX) throw std::invalid_argument("assemble_labels: more than 2**31 - 1 masks");
    const float thr = mask_logit_threshold();
    const float hot = thr - 1e-3f;
    // each thread takes a band of rows and goes through all masks in order: every pixel is
    // written by one thread, in mask order, so the result does not depend on the thread count
    int nthreads = threads > 0 ? threads : static_cast<int>(std::min(8u, std::max(1u, std::thread::hardware_concurrency())));
    nthreads = std::max(1, std::min(nthreads, height / 32));
    auto band = [&](int row_begin, int row_end) {
        Upsampler up(height, width, row_begin, row_end);
        for (int64_t k = 0; k < n; ++k) {
            const int32_t label = static_cast<int32_t>(k + 1);
            const float* logits = lowres + static_cast<size_t>(k) * kLowRes * kLowRes;
            if (!up.plan(logits, hot, false)) continue;
            if (up.max_abs() <= 1e30f) {
                up.fast(logits, thr, label, out);
                continue;
            }
            up.exact(logits, [&](int y, const Span& s, const float* sa, const float* sb, float w1, float w) {
                int32_t* o = out + static_cast<int64_t>(y) * width;
                const int32_t a = s.a, b = s.b;  // locals: the int32 stores could alias the span
                for (int32_t x = a; x <= b; ++x) o[x] = lerp(w1, sa[x], w, sb[x]) >= thr ? label : o[x];
            });
        }
    };
    if (nthreads == 1) {
        band(0, height);
        return;
    }
    std::vector<std::thread> pool;
    std::vector<std::exception_ptr> errors(nthreads);
    for (int t = 0; t < nthreads; ++t) {
        const int row_begin = static_cast<int>(static_cast<int64_t>(height) * t / nthreads);
        const int row_end = static_cast<int>(static_cast<int64_t>(height) * (t + 1) / nthreads);
        pool.emplace_back([&, t, row_begin, row_end] {
            try {
                band(row_begin, row_end);
            } catch (...) {
                errors[t] = std::current_exception();
            }
        });
    }
    for (auto& th : pool) th.join();
    for (auto& e : errors)
        if (e) std::rethrow_exception(e);
}

void upsample_logits(const float* lowres, int height, int width, float* out) {
    if (height <= 0 || width <= 0) return;
    Upsampler up(height, width);
    if (!up.plan(lowres, 0.0f, true)) return;
    up.exact(lowres, [&](int y, const Span& s, const float* sa, const float* sb, float w1, float w) {
        float* o = out + static_cast<int64_t>(y) * width;
        blend_rows(sa, sb, w1, w, s, o);
    });
}

namespace {

struct Run {  // pixels [c0, c1] of row r
    int32_t r, c0, c1;
};

struct Box {
    int32_t r0 = INT32_MAX, r1 = -1, c0 = INT32_MAX, c1 = -1;
    void add(const Run& run) {
        r0 = std::min(r0, run.r);
        r1 = std::max(r1, run.r);
        c0 = std::min(c0, run.c0);
        c1 = std::max(c1, run.c1);
    }
};

int32_t find_root(std::vector<int32_t>& parent, int32_t i) {
    while (parent[i] != i) {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    return i;
}

}  // namespace

// Works on runs (row segments) instead of pixels, so that a label costs about its number of
// pixels and the height of its box, not the area of its box.
//
// 1. The input's runs of equal positive labels, grouped by label in row-major order; each
//    label's bounding box from them (scipy.ndimage.find_objects).
// 2. Labels in increasing order. The label's current pixels: its input runs where the map still
//    holds it (an earlier label's hole filling may have overwritten some; no label gains pixels,
//    since written labels are never larger than the one being processed).
// 3. Holes: the background (everything != label) of each box row is a set of intervals between
//    the label's runs; intervals in adjacent rows that share a column are 4-connected (union-find);
//    a component that reaches the box border (first/last row or column) is not a hole. This is
//    scipy.ndimage.binary_fill_holes (cross-shaped structure, border_value 1) inside the box.
void fill_holes_and_remove_small_masks(int32_t* m, int height, int width, int64_t min_size,
                                       std::vector<int64_t>* sources) {
    if (sources) sources->clear();
    const int64_t n = static_cast<int64_t>(height) * width;
    if (n <= 0) return;
    int32_t max_label = 0;
    for (int64_t i = 0; i < n; ++i) max_label = std::max(max_label, m[i]);
    if (max_label <= 0) return;

    // 1. runs of positive labels, with their label
    std::vector<Run> runs;
    std::vector<int32_t> run_label;
    for (int32_t r = 0; r < height; ++r) {
        const int32_t* row = m + static_cast<int64_t>(r) * width;
        int32_t c = 0;
        while (c < width) {
            const int32_t v = row[c];
            int32_t e = c + 1;
            while (e < width && row[e] == v) ++e;
            if (v > 0) {
                runs.push_back({r, c, e - 1});
                run_label.push_back(v);
            }
            c = e;
        }
    }
    // present labels in increasing order, and each run's label index
    std::vector<int32_t> ids;
    std::vector<int32_t> run_index(runs.size());
    if (static_cast<int64_t>(max_label) <= std::max<int64_t>(n, 1 << 16)) {
        std::vector<int32_t> slot(static_cast<size_t>(max_label) + 1, -1);
        for (int32_t v : run_label) slot[v] = 0;
        for (int32_t v = 1; v <= max_label; ++v)
            if (slot[v] == 0) {
                slot[v] = static_cast<int32_t>(ids.size());
                ids.push_back(v);
            }
        for (size_t i = 0; i < runs.size(); ++i) run_index[i] = slot[run_label[i]];
    } else {  // sparse, very large label values
        ids = run_label;
        std::sort(ids.begin(), ids.end());
        ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
        for (size_t i = 0; i < runs.size(); ++i)
            run_index[i] = static_cast<int32_t>(std::lower_bound(ids.begin(), ids.end(), run_label[i]) - ids.begin());
    }
    // group the runs by label (stable: row-major order within a label), boxes
    const size_t nl = ids.size();
    std::vector<int64_t> start(nl + 1, 0);
    for (int32_t k : run_index) ++start[k + 1];
    for (size_t k = 0; k < nl; ++k) start[k + 1] += start[k];
    std::vector<Run> grouped(runs.size());
    {
        std::vector<int64_t> fill(start.begin(), start.end() - 1);
        for (size_t i = 0; i < runs.size(); ++i) grouped[fill[run_index[i]]++] = runs[i];
    }
    std::vector<Run>().swap(runs);
    std::vector<int32_t>().swap(run_label);
    std::vector<int32_t>().swap(run_index);

    int32_t next = 0;  // labels written so far (the official loop's j)
    std::vector<Run> cur, gaps;
    std::vector<int32_t> parent, gap_row_start;
    std::vector<uint8_t> border;
    for (size_t k = 0; k < nl; ++k) {
        const int32_t v = ids[k];
        Box b;
        for (int64_t i = start[k]; i < start[k + 1]; ++i) b.add(grouped[i]);
        // 2. current pixels
        cur.clear();
        int64_t npix = 0;
        for (int64_t i = start[k]; i < start[k + 1]; ++i) {
            const Run& run = grouped[i];
            const int32_t* row = m + static_cast<int64_t>(run.r) * width;
            int32_t c = run.c0;
            while (c <= run.c1) {
                while (c <= run.c1 && row[c] != v) ++c;
                if (c > run.c1) break;
                int32_t e = c;
                while (e + 1 <= run.c1 && row[e + 1] == v) ++e;
                cur.push_back({run.r, c, e});
                npix += e - c + 1;
                c = e + 1;
            }
        }
        if (min_size > 0 && npix < min_size) {
            for (const Run& run : cur) std::fill(m + int64_t(run.r) * width + run.c0, m + int64_t(run.r) * width + run.c1 + 1, 0);
            continue;
        }
        if (npix == 0) continue;
        ++next;
        if (sources) sources->push_back(v);
        // 3. background intervals of each box row, row by row (cur is in row-major order)
        gaps.clear();
        gap_row_start.assign(static_cast<size_t>(b.r1 - b.r0) + 2, 0);
        size_t ci = 0;
        for (int32_t r = b.r0; r <= b.r1; ++r) {
            gap_row_start[r - b.r0] = static_cast<int32_t>(gaps.size());
            int32_t pos = b.c0;
            for (; ci < cur.size() && cur[ci].r == r; ++ci) {
                if (cur[ci].c0 > pos) gaps.push_back({r, pos, cur[ci].c0 - 1});
                pos = cur[ci].c1 + 1;
            }
            if (pos <= b.c1) gaps.push_back({r, pos, b.c1});
        }
        gap_row_start[b.r1 - b.r0 + 1] = static_cast<int32_t>(gaps.size());
        const int32_t ng = static_cast<int32_t>(gaps.size());
        parent.resize(ng);
        for (int32_t i = 0; i < ng; ++i) parent[i] = i;
        for (int32_t r = b.r0; r < b.r1; ++r) {  // rows r and r + 1: union the overlapping intervals
            int32_t i = gap_row_start[r - b.r0], ie = gap_row_start[r - b.r0 + 1];
            int32_t j = ie, je = gap_row_start[r - b.r0 + 2];
            while (i < ie && j < je) {
                if (gaps[i].c0 <= gaps[j].c1 && gaps[j].c0 <= gaps[i].c1) {
                    const int32_t ri = find_root(parent, i), rj = find_root(parent, j);
                    if (ri != rj) parent[std::max(ri, rj)] = std::min(ri, rj);
                }
                if (gaps[i].c1 < gaps[j].c1)
                    ++i;
                else
                    ++j;
            }
        }
        border.assign(ng, 0);
        for (int32_t i = 0; i < ng; ++i) {
            const Run& g = gaps[i];
            if (g.r == b.r0 || g.r == b.r1 || g.c0 == b.c0 || g.c1 == b.c1) border[find_root(parent, i)] = 1;
        }
        // write: the label's pixels and its holes
        for (const Run& run : cur) std::fill(m + int64_t(run.r) * width + run.c0, m + int64_t(run.r) * width + run.c1 + 1, next);
        for (int32_t i = 0; i < ng; ++i)
            if (!border[find_root(parent, i)]) {
                const Run& g = gaps[i];
                std::fill(m + int64_t(g.r) * width + g.c0, m + int64_t(g.r) * width + g.c1 + 1, next);
            }
    }
}

std::vector<std::pair<int64_t, int64_t>> link_labels_by_iou(const int32_t* a, const int32_t* b, int64_t npix,
                                                             double min_iou) {
    if (npix >= (int64_t(1) << 32))
        throw std::invalid_argument("link_labels_by_iou: the overlap region must have fewer than 2**32 pixels");
    std::unordered_map<int32_t, int64_t> area_a, area_b;
    std::unordered_map<uint64_t, int64_t> inter;
    auto key = [](int32_t la, int32_t lb) {
        return (static_cast<uint64_t>(static_cast<uint32_t>(la)) << 32) | static_cast<uint32_t>(lb);
    };
    // runs of equal (la, lb) along the flat index: one hash update per run
    int64_t i = 0;
    while (i < npix) {
        const int32_t la = a[i], lb = b[i];
        int64_t j = i + 1;
        while (j < npix && a[j] == la && b[j] == lb) ++j;
        const int64_t run = j - i;
        if (la > 0) area_a[la] += run;
        if (lb > 0) area_b[lb] += run;
        if (la > 0 && lb > 0) inter[key(la, lb)] += run;
        i = j;
    }
    struct Cand {
        int32_t la, lb;
        uint64_t inter, uni;
    };
    std::vector<Cand> cands;
    for (const auto& kv : inter) {
        const int32_t la = static_cast<int32_t>(kv.first >> 32), lb = static_cast<int32_t>(kv.first & 0xffffffffu);
        const uint64_t in = static_cast<uint64_t>(kv.second);
        const uint64_t un = static_cast<uint64_t>(area_a[la] + area_b[lb]) - in;
        if (static_cast<double>(in) / static_cast<double>(un) >= min_iou) cands.push_back({la, lb, in, un});
    }
    // descending IoU, compared exactly (counts < 2**32, so the products fit in 64 bits);
    // ties by (label_a, label_b) ascending
    std::sort(cands.begin(), cands.end(), [](const Cand& x, const Cand& y) {
        const uint64_t lhs = x.inter * y.uni, rhs = y.inter * x.uni;
        if (lhs != rhs) return lhs > rhs;
        if (x.la != y.la) return x.la < y.la;
        return x.lb < y.lb;
    });
    std::unordered_set<int32_t> used_a, used_b;
    std::vector<std::pair<int64_t, int64_t>> out;
    for (const Cand& c : cands) {
        if (used_a.count(c.la) || used_b.count(c.lb)) continue;
        used_a.insert(c.la);
        used_b.insert(c.lb);
        out.emplace_back(c.la, c.lb);
    }
    return out;
}

}  // namespace cellsam
