// Native post-processing for cellsam-trt (see postprocess.hpp).
//
// Exactness: every interpolated value is computed with the same float32 operations, in the
// same order, as the NumPy reference (tests/reference_postprocess.py): a width pass then a
// height pass per stage, value = (1 - w) * a + w * b with each product and the sum rounded to
// float32. setup.py compiles with -ffp-contract=off so that no compiler fuses them into an FMA.
// Each value depends only on its own taps, so computing it on a smaller region than the
// reference does not change it.

#include "postprocess.hpp"

#include <algorithm>
#include <climits>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <unordered_map>
#include <unordered_set>

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

// Bilinear 256 -> 1024 -> (height, width) of one mask, computed only where the mask can be on.
//
// Bilinear interpolation is a convex combination, so an output can only clear the threshold if
// one of the low-res logits it depends on does ("hot": > threshold - 1e-3, a margin far above
// float32 rounding). Per row, the hot columns are bounded by a span; spans are pushed forward
// through the four passes (low-res -> stage-1 width pass -> stage-1 height pass -> final width
// pass -> final height pass) to give, for each final row, the span of columns that can be on.
// Then the spans are pulled backward to find what each intermediate row must provide, and
// only that is computed.
class Upsampler {
   public:
    Upsampler(int height, int width)
        : H_(height),
          W_(width),
          t1_(make_taps(kLowRes, kModelSize)),
          ty_(make_taps(kModelSize, height)),
          tx_(make_taps(kModelSize, width)),
          hot_(kLowRes),
          hot_v_(kLowRes),
          need_v_(kLowRes),
          hot_s_(kModelSize),
          need_s_(kModelSize),
          need_u_(kModelSize),
          hot_f_(height),
          // not zeroed: every value is written before it is read
          v_(new float[static_cast<size_t>(kLowRes) * kModelSize]),
          u_(new float[static_cast<size_t>(kModelSize) * kModelSize]),
          s_(new float[static_cast<size_t>(kModelSize) * width]) {}

    // sink(y, span, sa, sb, w1, w): final row y over span = w1 * sa[x] + w * sb[x]
    template <class Sink>
    void run(const float* logits, float hot_threshold, bool full, Sink&& sink) {
        if (H_ == 0 || W_ == 0) return;
        int rmin = INT_MAX, rmax = -1;
        for (int r = 0; r < kLowRes; ++r) {
            Span h;
            if (full) {
                h = Span{0, kLowRes - 1};
            } else {
                const float* row = logits + static_cast<size_t>(r) * kLowRes;
                unsigned any = 0;
                for (int c = 0; c < kLowRes; ++c) any |= static_cast<unsigned>(row[c] > hot_threshold);
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
        if (rmax < 0) return;
        // forward: stage-1 rows R0..R1 that can be hot, and their final-column spans
        const int R0 = t1_.first_out[rmin], R1 = t1_.last_out[rmax];
        if (R0 > R1) return;
        for (int r = rmin; r <= rmax; ++r) hot_v_[r] = forward(t1_, hot_[r]);
        auto hot_v = [&](int r) { return (r < rmin || r > rmax) ? Span{} : hot_v_[r]; };
        for (int R = R0; R <= R1; ++R) {
            Span u = hot_v(t1_.lo[R]);
            u.add(hot_v(t1_.hi[R]));
            hot_s_[R] = forward(tx_, u);
        }
        auto hot_s = [&](int R) { return (R < R0 || R > R1) ? Span{} : hot_s_[R]; };
        const int y0 = ty_.first_out[R0], y1 = ty_.last_out[R1];
        if (y0 > y1) return;
        // backward: what each stage-1 row must provide to the final rows y0..y1
        const int S0 = ty_.lo[y0], S1 = ty_.hi[y1];
        for (int R = S0; R <= S1; ++R) need_s_[R] = Span{};
        for (int y = y0; y <= y1; ++y) {
            Span f = hot_s(ty_.lo[y]);
            f.add(hot_s(ty_.hi[y]));
            hot_f_[y] = f;
            need_s_[ty_.lo[y]].add(f);
            need_s_[ty_.hi[y]].add(f);
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
        for (int y = y0; y <= y1; ++y)
            if (!hot_f_[y].empty()) sink(y, hot_f_[y], srow(ty_.lo[y]), srow(ty_.hi[y]), ty_.w1[y], ty_.w[y]);
    }

   private:
    float* vrow(int r) { return v_.get() + static_cast<size_t>(r) * kModelSize; }
    float* urow(int R) { return u_.get() + static_cast<size_t>(R) * kModelSize; }
    float* srow(int R) { return s_.get() + static_cast<size_t>(R) * W_; }

    int H_, W_;
    Taps t1_, ty_, tx_;
    std::vector<Span> hot_, hot_v_, need_v_, hot_s_, need_s_, need_u_, hot_f_;
    std::unique_ptr<float[]> v_, u_, s_;
};

}  // namespace

void assemble_labels(const float* lowres, int64_t n, int height, int width, int32_t* out) {
    if (n <= 0 || height <= 0 || width <= 0) return;
    if (n > INT32_MAX) throw std::invalid_argument("assemble_labels: more than 2**31 - 1 masks");
    const float thr = mask_logit_threshold();
    const float hot = thr - 1e-3f;
    Upsampler up(height, width);
    for (int64_t k = 0; k < n; ++k) {
        const int32_t label = static_cast<int32_t>(k + 1);
        up.run(lowres + static_cast<size_t>(k) * kLowRes * kLowRes, hot, false,
               [&](int y, const Span& s, const float* sa, const float* sb, float w1, float w) {
                   int32_t* o = out + static_cast<int64_t>(y) * width;
                   for (int32_t x = s.a; x <= s.b; ++x) {
                       const float p = w1 * sa[x];
                       const float q = w * sb[x];
                       const float v = p + q;
                       o[x] = v >= thr ? label : o[x];
                   }
               });
    }
}

void upsample_logits(const float* lowres, int height, int width, float* out) {
    if (height <= 0 || width <= 0) return;
    Upsampler up(height, width);
    up.run(lowres, 0.0f, true, [&](int y, const Span& s, const float* sa, const float* sb, float w1, float w) {
        float* o = out + static_cast<int64_t>(y) * width;
        blend_rows(sa, sb, w1, w, s, o);
    });
}

namespace {

struct Box {
    int32_t r0 = INT32_MAX, r1 = -1, c0 = INT32_MAX, c1 = -1;
    bool empty() const { return r1 < 0; }
    void add(int32_t r, int32_t c) {
        r0 = std::min(r0, r);
        r1 = std::max(r1, r);
        c0 = std::min(c0, c);
        c1 = std::max(c1, c);
    }
};

}  // namespace

void fill_holes_and_remove_small_masks(int32_t* m, int height, int width, int64_t min_size) {
    const int64_t n = static_cast<int64_t>(height) * width;
    if (n <= 0) return;
    int32_t max_label = 0;
    for (int64_t i = 0; i < n; ++i) max_label = std::max(max_label, m[i]);
    if (max_label <= 0) return;

    // scipy.ndimage.find_objects on the input: bounding boxes of the positive labels, in
    // increasing label order (labels <= 0 are background)
    std::vector<int32_t> ids;
    std::vector<Box> boxes;
    if (static_cast<int64_t>(max_label) <= std::max<int64_t>(n, 1 << 16)) {
        std::vector<Box> by_label(static_cast<size_t>(max_label) + 1);
        for (int32_t r = 0; r < height; ++r) {
            const int32_t* row = m + static_cast<int64_t>(r) * width;
            for (int32_t c = 0; c < width; ++c)
                if (row[c] > 0) by_label[row[c]].add(r, c);
        }
        for (int32_t v = 1; v <= max_label; ++v)
            if (!by_label[v].empty()) {
                ids.push_back(v);
                boxes.push_back(by_label[v]);
            }
    } else {  // sparse, very large label values
        for (int64_t i = 0; i < n; ++i)
            if (m[i] > 0) ids.push_back(m[i]);
        std::sort(ids.begin(), ids.end());
        ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
        boxes.resize(ids.size());
        for (int32_t r = 0; r < height; ++r) {
            const int32_t* row = m + static_cast<int64_t>(r) * width;
            for (int32_t c = 0; c < width; ++c)
                if (row[c] > 0) boxes[std::lower_bound(ids.begin(), ids.end(), row[c]) - ids.begin()].add(r, c);
        }
    }

    int32_t next = 0;  // labels written so far (the official loop's j)
    std::vector<uint8_t> reached;
    std::vector<int32_t> stack;
    for (size_t k = 0; k < ids.size(); ++k) {
        const int32_t v = ids[k];
        const Box& b = boxes[k];
        const int32_t h = b.r1 - b.r0 + 1, w = b.c1 - b.c0 + 1;
        auto at = [&](int32_t i, int32_t j) -> int32_t& {
            return m[static_cast<int64_t>(b.r0 + i) * width + (b.c0 + j)];
        };
        // pixels of v now (earlier labels' hole filling may have overwritten some)
        int64_t npix = 0;
        for (int32_t i = 0; i < h; ++i)
            for (int32_t j = 0; j < w; ++j) npix += at(i, j) == v;
        if (min_size > 0 && npix < min_size) {
            for (int32_t i = 0; i < h; ++i)
                for (int32_t j = 0; j < w; ++j)
                    if (at(i, j) == v) at(i, j) = 0;
            continue;
        }
        if (npix == 0) continue;
        ++next;
        // scipy.ndimage.binary_fill_holes inside the box: the background (!= v) 4-connected to
        // the box border stays; everything else (v and the enclosed holes) becomes `next`
        const size_t area = static_cast<size_t>(h) * static_cast<size_t>(w);
        reached.assign(area, 0);
        stack.clear();
        auto visit = [&](int32_t i, int32_t j) {
            const size_t idx = static_cast<size_t>(i) * w + j;
            if (!reached[idx] && at(i, j) != v) {
                reached[idx] = 1;
                stack.push_back(static_cast<int32_t>(idx));
            }
        };
        for (int32_t j = 0; j < w; ++j) {
            visit(0, j);
            visit(h - 1, j);
        }
        for (int32_t i = 0; i < h; ++i) {
            visit(i, 0);
            visit(i, w - 1);
        }
        while (!stack.empty()) {
            const int32_t idx = stack.back();
            stack.pop_back();
            const int32_t i = idx / w, j = idx % w;
            if (i > 0) visit(i - 1, j);
            if (i + 1 < h) visit(i + 1, j);
            if (j > 0) visit(i, j - 1);
            if (j + 1 < w) visit(i, j + 1);
        }
        for (int32_t i = 0; i < h; ++i)
            for (int32_t j = 0; j < w; ++j)
                if (!reached[static_cast<size_t>(i) * w + j]) at(i, j) = next;
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
