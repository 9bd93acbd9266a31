// pybind11 bindings: the module cellsam_trt._native (built by setup.py).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <string>
#include <vector>

#include "postprocess.hpp"

namespace py = pybind11;

namespace {

using FloatIn = py::array_t<float, py::array::c_style | py::array::forcecast>;
// int32 labels: other integer dtypes are converted only where that is safe (int8/16, uint8/16)
using LabelsIn = py::array_t<int32_t, py::array::c_style>;

int checked_size(int64_t v, const char* name) {
    if (v < 0 || v > INT32_MAX) throw py::value_error(std::string(name) + " must be in [0, 2**31 - 1], got " +
                                                      std::to_string(v));
    return static_cast<int>(v);
}

py::array_t<int32_t> assemble_labels(FloatIn lowres, int64_t height, int64_t width, int threads) {
    if (lowres.ndim() != 3 || lowres.shape(1) != cellsam::kLowRes || lowres.shape(2) != cellsam::kLowRes)
        throw py::value_error("assemble_labels: lowres must have shape (N, 256, 256)");
    const int h = checked_size(height, "height"), w = checked_size(width, "width");
    py::array_t<int32_t> out({static_cast<py::ssize_t>(h), static_cast<py::ssize_t>(w)});
    int32_t* o = out.mutable_data();
    const float* in = lowres.data();
    const int64_t n = lowres.shape(0);
    {
        py::gil_scoped_release release;
        std::memset(o, 0, sizeof(int32_t) * static_cast<size_t>(h) * static_cast<size_t>(w));
        cellsam::assemble_labels(in, n, h, w, o, threads);
    }
    return out;
}

py::array_t<float> upsample_logits(FloatIn logits, int64_t height, int64_t width) {
    if (logits.ndim() != 2 || logits.shape(0) != cellsam::kLowRes || logits.shape(1) != cellsam::kLowRes)
        throw py::value_error("upsample_logits: logits must have shape (256, 256)");
    const int h = checked_size(height, "height"), w = checked_size(width, "width");
    py::array_t<float> out({static_cast<py::ssize_t>(h), static_cast<py::ssize_t>(w)});
    float* o = out.mutable_data();
    const float* in = logits.data();
    {
        py::gil_scoped_release release;
        cellsam::upsample_logits(in, h, w, o);
    }
    return out;
}

py::array_t<int32_t> fill_holes(LabelsIn labels, int64_t min_size) {
    if (labels.ndim() != 2) throw py::value_error("fill_holes_and_remove_small_masks: labels must be 2-D (H, W)");
    const int h = checked_size(labels.shape(0), "height"), w = checked_size(labels.shape(1), "width");
    py::array_t<int32_t> out({static_cast<py::ssize_t>(h), static_cast<py::ssize_t>(w)});
    int32_t* o = out.mutable_data();
    const int32_t* in = labels.data();
    {
        py::gil_scoped_release release;
        std::memcpy(o, in, sizeof(int32_t) * static_cast<size_t>(h) * static_cast<size_t>(w));
        cellsam::fill_holes_and_remove_small_masks(o, h, w, min_size);
    }
    return out;
}

py::tuple fill_holes_with_sources(LabelsIn labels, int64_t min_size) {
    if (labels.ndim() != 2)
        throw py::value_error("fill_holes_and_remove_small_masks_with_sources: labels must be 2-D (H, W)");
    const int h = checked_size(labels.shape(0), "height"), w = checked_size(labels.shape(1), "width");
    py::array_t<int32_t> out({static_cast<py::ssize_t>(h), static_cast<py::ssize_t>(w)});
    int32_t* o = out.mutable_data();
    const int32_t* in = labels.data();
    std::vector<int64_t> sources;
    {
        py::gil_scoped_release release;
        std::memcpy(o, in, sizeof(int32_t) * static_cast<size_t>(h) * static_cast<size_t>(w));
        cellsam::fill_holes_and_remove_small_masks(o, h, w, min_size, &sources);
    }
    py::array_t<int64_t> src(static_cast<py::ssize_t>(sources.size()));
    if (!sources.empty()) std::memcpy(src.mutable_data(), sources.data(), sizeof(int64_t) * sources.size());
    return py::make_tuple(out, src);
}

py::array_t<int64_t> link_labels_by_iou(LabelsIn a, LabelsIn b, double min_iou) {
    if (a.ndim() != b.ndim()) throw py::value_error("link_labels_by_iou: a and b must have the same shape");
    for (py::ssize_t d = 0; d < a.ndim(); ++d)
        if (a.shape(d) != b.shape(d)) throw py::value_error("link_labels_by_iou: a and b must have the same shape");
    const int32_t* pa = a.data();
    const int32_t* pb = b.data();
    const int64_t n = a.size();
    std::vector<std::pair<int64_t, int64_t>> pairs;
    {
        py::gil_scoped_release release;
        pairs = cellsam::link_labels_by_iou(pa, pb, n, min_iou);
    }
    py::array_t<int64_t> out({static_cast<py::ssize_t>(pairs.size()), static_cast<py::ssize_t>(2)});
    int64_t* o = out.mutable_data();
    for (size_t i = 0; i < pairs.size(); ++i) {
        o[2 * i] = pairs[i].first;
        o[2 * i + 1] = pairs[i].second;
    }
    return out;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "cellsam-trt native post-processing: low-res mask logits -> label map, hole filling, tile linking.";
    m.attr("LOGIT_THRESHOLD") = cellsam::mask_logit_threshold();

    m.def("assemble_labels", &assemble_labels, py::arg("lowres"), py::arg("height"), py::arg("width"),
          py::arg("threads") = 1,
          R"doc(Kept masks' low-res logits -> label map.

lowres: float32 (N, 256, 256) mask-decoder logits (other float dtypes are cast to float32).
height, width: the original image size in pixels.
Returns int32 (height, width): mask k (0-based) is label k + 1, 0 is background, a later mask
wins an overlap. Per mask: bilinear upsampling (align_corners=False, no antialias) 256 -> 1024
-> (height, width), width pass then height pass, in float32 exactly as the NumPy reference;
on = float32(sigmoid(logit)) > 0.4 with a correctly rounded sigmoid, i.e. logit >=
LOGIT_THRESHOLD (-0.405465, 1e-7 above log(0.4 / 0.6)). Only the pixels a mask can reach are
computed. threads: bands of rows computed in parallel (0: one per core, at most 8; each band
of at least 32 rows); the result does not depend on it. Releases the GIL.)doc");

    m.def("upsample_logits", &upsample_logits, py::arg("logits"), py::arg("height"), py::arg("width"),
          R"doc(One mask's float32 (256, 256) logits -> its interpolated float32 logits (height, width)
on every pixel, with the arithmetic of assemble_labels (for tests and inspection).)doc");

    m.def("fill_holes_and_remove_small_masks", &fill_holes, py::arg("labels"), py::arg("min_size") = 25,
          R"doc(The official post-processing of a label map; returns a new int32 (H, W) array.

labels: int32 (H, W) (int8/int16/uint8/uint16 are converted; values <= 0 are background).
min_size: pixels. Labels in increasing order, bounding boxes taken from the input
(scipy.ndimage.find_objects): a label with fewer than min_size pixels (counted when it is
reached, after earlier labels' filling) is deleted; otherwise its holes inside its bounding box
(background not 4-connected to the box border, scipy.ndimage.binary_fill_holes) are filled and
the filled region is written with the next sequential label 1, 2, ..., overwriting whatever lies
in the holes. Identical to the NumPy/SciPy loop. Releases the GIL.)doc");

    m.def("fill_holes_and_remove_small_masks_with_sources", &fill_holes_with_sources, py::arg("labels"),
          py::arg("min_size") = 25,
          R"doc(fill_holes_and_remove_small_masks, also returning where each final label came from.

Returns (final, sources): final is the int32 (H, W) map of fill_holes_and_remove_small_masks;
sources is int64 (K,), K = the number of final labels the loop wrote, and sources[k - 1] is the
input label that final label k was written for (for an assembled map: the 1-based index of the
kept mask). Taken from the loop itself, not from pixel counts: an input label whose pixels an
earlier label's hole filling covered gets no final label, and a final label may have no pixels
left in `final` (covered by a later label's hole filling). Releases the GIL.)doc");

    m.def("link_labels_by_iou", &link_labels_by_iou, py::arg("a"), py::arg("b"), py::arg("min_iou"),
          R"doc(Match the labels of two label maps of the same region (the overlap of two tiles).

a, b: int32 arrays of the same shape (values <= 0 are background). min_iou: a float in [0, 1].
IoU of (label_a, label_b) = |a == label_a and b == label_b| / |a == label_a or b == label_b|,
counted inside the region; candidates are the overlapping pairs with IoU >= min_iou (IoU
evaluated in float64). Greedy one-to-one matching by descending IoU (compared exactly), ties
by (label_a, label_b) ascending. Returns int64 (M, 2) rows (label_a, label_b) in the order they
were matched. Deterministic. Releases the GIL.)doc");
}
