// Native post-processing for cellsam-trt: low-res mask logits -> label map, hole filling,
// linking the labels of two overlapping tiles. Plain C++17, no Python: bindings.cpp wraps it.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace cellsam {

constexpr int kLowRes = 256;     // SAM low-res mask side
constexpr int kModelSize = 1024;  // SAM input side

// The float32 logit threshold: a pixel is on iff its interpolated logit x satisfies
// x >= mask_logit_threshold() (= -0.405465f), i.e. float32(sigmoid(x)) > 0.4f with a correctly
// rounded sigmoid; 1e-7 above log(0.4 / 0.6). Library float32 sigmoids flip within a few
// float32 steps of it (torch 2.13 CPU at the same value, NumPy 2.4 three steps above).
float mask_logit_threshold();

// One axis of bilinear resampling, align_corners=False, no antialias, in the float32
// arithmetic of PyTorch's index computation: scale = float(n_in) / float(n_out),
// src = max(scale * (i + 0.5) - 0.5, 0), lo = min(int(src), n_in - 1), hi = min(lo + 1, n_in - 1),
// w = src - lo; output = (1 - w) * in[lo] + w * in[hi] (each operation rounded to float32).
struct Taps {
    int n_in = 0, n_out = 0;
    std::vector<int32_t> lo, hi;
    std::vector<float> w, w1;  // weight of hi, and 1 - w (rounded to float32)
    // for input index i: first output whose taps reach i or beyond (n_out if none),
    // last output whose taps start at or before i (-1 if none)
    std::vector<int32_t> first_out, last_out;
};
Taps make_taps(int n_in, int n_out);

// lowres: n masks of (256, 256) float32 logits, C order. out: (height, width) int32, must be
// zero on entry. Mask k (0-based) writes label k + 1 where it is on; a later mask wins.
// threads: bands of rows computed in parallel (<= 0: one per core, at most 8); the result does
// not depend on it.
void assemble_labels(const float* lowres, int64_t n, int height, int width, int32_t* out, int threads = 1);

// One mask, every output pixel: the interpolated float32 logits (height, width). For tests.
void upsample_logits(const float* lowres, int height, int width, float* out);

// In place on labels (height, width): the official fill_holes_and_remove_small_masks.
// sources (optional): cleared, then receives for each final label k = 1, 2, ... (in order) the
// input label it was written for, i.e. sources[k - 1] = the label the loop was processing when
// it wrote k. A final label may end up with no pixels (a later label's hole filling can cover
// it), and an input label may get none (deleted as small, or covered by an earlier label's
// hole filling), so this is not recoverable from pixel counts of the input.
void fill_holes_and_remove_small_masks(int32_t* labels, int height, int width, int64_t min_size,
                                       std::vector<int64_t>* sources = nullptr);

// Labels a and b (height, width) of the same region: greedy one-to-one matching by IoU.
std::vector<std::pair<int64_t, int64_t>> link_labels_by_iou(const int32_t* a, const int32_t* b, int64_t npix,
                                                             double min_iou);

}  // namespace cellsam
