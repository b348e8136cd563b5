#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz harnesses: tests/fuzz/corpus/ for
fuzz_token.c and tests/fuzz/corpus_spatial/ for fuzz_spatial.c.

Each seed is one call in fuzz_token.c's input format, chosen to start the
fuzzer at the interesting places: every op and dtype on a small dense call,
threaded sizes, strided / negative / broadcast rows, in-place calls, aliases
one element off, the faults the contract names (NULL, sizes, dtypes, eps,
flags, scratch) and strides whose extent overflows int64. The fuzzer mutates
from there; `python3 tests/fuzz/make_corpus.py` rewrites the seeds.

Input format (see decode() in fuzz_token.c):
  op, dtype, wdtype, threads, size mode, B, T, C (+2 bytes in the larger mode),
  eps, flags, scratch, strides-NULL, then 5 bytes per buffer (mode, stride,
  batch stride, alias target, delta) for inp, residual, weight, bias, dout,
  mean(in), rstd(in), out, h, mean, rstd, dinp, dweight, dbias, scratch;
  the last byte of the input picks the value distribution (mod 3).
"""
import os

OPS = ["ln_fwd", "ln_add", "ln_bwd", "rms_fwd", "rms_add", "rms_bwd"]
BUFS = ["inp", "res", "w", "b", "dout", "mean_in", "rstd_in", "out", "h", "mean", "rstd", "dinp", "dw", "db",
        "scratch"]
F32, F16, BF16, F64 = 0, 1, 2, 3


def seed(op, dt=F32, wdt="same", threads=1, size=("small", 1, 2, 5), eps=0, flags=0, scratch=2,
         strides_null=200, bufs=None, values=0):
    """bufs: {name: (mode, stride, batch_stride, target, delta)}; unnamed buffers
    get (255 - 55 = 200 would alias, so) mode 150: present, own memory, dense."""
    out = [OPS.index(op), dt]
    out.append({"same": 0, "f32": 150, "bad": 251}.get(wdt, wdt))
    out.append([0, 1, 2, 3, 4, 1, 2, 8].index(threads))
    kind = size[0]
    if kind == "small":      # B = 1 + a%4, T = 1 + b%5, C = 1 + c%48 (c < 128)
        _, B, T, C = size
        out += [0, B - 1, T - 1, C - 1]
    elif kind == "larger":   # B = 1 + a%8, T = 1 + b%40, C = 64 + u16%4096 + c%3
        _, B, T, C = size
        out += [230, B - 1, T - 1, 0, (C - 64) & 255, (C - 64) >> 8]
    else:                    # hostile: raw bytes a, b, c
        out += [250] + list(size[1:])
    out += [eps, flags, scratch, strides_null]
    bufs = bufs or {}
    for name in BUFS:
        out += list(bufs.get(name, (150, 0, 0, 0, 0)))
    out.append(values)
    return bytes(out)


SP_OPS = ["gn_fwd", "gn_bwd", "bn_fwd", "bn_bwd"]
SP_BUFS = ["inp", "w", "b", "dout", "smean", "srstd", "rmean", "rvar", "out", "mean", "rstd", "dinp", "dw", "db",
           "scratch"]


def spatial_seed(op, dt=F32, wdt="same", rdt="same", layout=0, threads=1, size=("small", 2, 4, 9), groups=1,
                 eps=0, momentum=0, nbt=0, flags=0, scratch=3, bufs=None, values=0):
    """One input of fuzz_spatial.c (see its decode())."""
    out = [SP_OPS.index(op), dt, {"same": 0, "f32": 150}.get(wdt, wdt), {"same": 0, "f32": 150}.get(rdt, rdt),
           layout, [0, 1, 2, 3].index(threads)]
    kind, N, C, S = size
    if kind == "small":        # N = 1 + a%4, C = 1 + b%12, S = 1 + c%9 (c < 128)
        out += [0, N - 1, C - 1, S - 1]
    elif kind == "larger":     # N = 1 + a%6, C = 1 + b%40, S = 100 + 40c (halved while N*C*S > 200000)
        out += [210, N - 1, C - 1, (S - 100) // 40]
    else:                      # hostile: raw bytes
        out += [240, N, C, S]
    out += [groups, eps, momentum, nbt, flags, scratch]
    bufs = bufs or {}
    for name in SP_BUFS:
        out += list(bufs.get(name, (150, 0, 0)))
    out.append(values)
    return bytes(out)


def spatial_seeds():
    seeds = {}
    names = {F32: "f32", F16: "f16", BF16: "bf16", F64: "f64"}
    for op in SP_OPS:
        for dt in (F32, F16, BF16, F64):
            # groups byte g: G = the largest divisor of C not above 1 + g % min(C, 16)
            seeds[f"{op}_{names[dt]}_nchw"] = spatial_seed(op, dt, layout=0, size=("small", 2, 6, 9), groups=2,
                                                           flags=2 if op.startswith("bn") else 0, values=dt)
        seeds[f"{op}_nhwc_f32w"] = spatial_seed(op, BF16, wdt="f32", layout=1, size=("small", 3, 8, 5), groups=3,
                                                flags=2 if op.startswith("bn") else 0)
    seeds["bn_fwd_eval"] = spatial_seed("bn_fwd", F32, size=("small", 2, 5, 4), flags=0)
    seeds["bn_fwd_cumulative_f32_running"] = spatial_seed("bn_fwd", F16, rdt="f32", size=("small", 4, 3, 7),
                                                          flags=2 | 4, nbt=3)
    seeds["bn_bwd_eval_accumulate"] = spatial_seed("bn_bwd", F64, size=("small", 2, 5, 3), flags=1)
    seeds["gn_fwd_threads_nhwc"] = spatial_seed("gn_fwd", F32, layout=1, threads=2, size=("larger", 3, 32, 900),
                                                groups=7)
    seeds["gn_bwd_threads_nchw"] = spatial_seed("gn_bwd", F32, layout=0, threads=3, size=("larger", 2, 16, 4100),
                                                groups=3, flags=1)
    seeds["bn_fwd_threads"] = spatial_seed("bn_fwd", BF16, layout=0, threads=2, size=("larger", 4, 9, 1300),
                                           flags=2)
    seeds["instance_norm"] = spatial_seed("gn_fwd", F32, size=("small", 2, 5, 9), groups=15)   # G = C
    seeds["gn_fwd_inplace"] = spatial_seed("gn_fwd", F32, size=("small", 2, 4, 6), bufs={"out": (220, 0, 1)})
    # faults
    seeds["gn_groups_not_dividing"] = spatial_seed("gn_fwd", F32, size=("small", 2, 6, 3), groups=210)
    seeds["bad_layout"] = spatial_seed("gn_bwd", F32, layout=250)
    seeds["bn_training_one_value"] = spatial_seed("bn_fwd", F32, size=("small", 1, 3, 1), flags=2)
    seeds["bn_momentum_nan"] = spatial_seed("bn_fwd", F32, flags=2, momentum=204)
    seeds["bn_eval_null_running"] = spatial_seed("bn_fwd", F32, flags=0, bufs={"rmean": (0, 0, 0)})
    seeds["gn_scratch_short"] = spatial_seed("gn_bwd", F32, scratch=5)
    seeds["bn_scratch_size_max"] = spatial_seed("bn_bwd", F32, scratch=135)
    seeds["sizes_hostile"] = spatial_seed("bn_bwd", F32, size=("hostile", 0x80 | 7, 0x80 | 6, 3))
    seeds["out_overlaps_running"] = spatial_seed("bn_fwd", F32, flags=0, bufs={"out": (220, 6, 2)})
    # BatchNorm backward through the batch statistics with one channel (NCHW):
    # found by the fuzzer (the channel of a set's j-th row taken as c0 + j)
    seeds["bn_bwd_one_channel"] = spatial_seed("bn_bwd", F32, layout=0, size=("small", 2, 1, 7), flags=2)
    # found by the fuzzer: BatchNorm forward, S = 2^31, NaN momentum; buffers
    # too large for the arena all start at its guard offset, so PN_ERR_ALIAS
    # is a right answer
    seeds["bn_fwd_huge_unplaced_momentum_nan"] = bytes.fromhex(
        "0200000000fffffefcf7ff00cc00820396000096000096000096000096000096000096000096000096000096000096000096"
        "000096000096000096000000")
    return seeds


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    corpus = os.path.join(here, "corpus")
    os.makedirs(corpus, exist_ok=True)
    for f in os.listdir(corpus):
        os.remove(os.path.join(corpus, f))
    seeds = {}
    names = {F32: "f32", F16: "f16", BF16: "bf16", F64: "f64"}
    # every op and dtype, small and dense; float32 weights for half inputs
    for op in OPS:
        for dt in (F32, F16, BF16, F64):
            seeds[f"{op}_{names[dt]}"] = seed(op, dt, size=("small", 2, 3, 37), values=dt)
        seeds[f"{op}_f16_f32w"] = seed(op, F16, wdt="f32", size=("small", 1, 4, 20))
    # threaded sizes (rows * C above the library's threading threshold)
    seeds["ln_fwd_threads"] = seed("ln_fwd", F32, threads=3, size=("larger", 4, 9, 1000))
    seeds["rms_bwd_threads"] = seed("rms_bwd", BF16, threads=2, size=("larger", 8, 5, 900), flags=200)
    # strides: padded rows, negative batch stride, broadcast input rows
    seeds["ln_fwd_strided"] = seed("ln_fwd", F32, size=("small", 3, 4, 17),
                                   bufs={"inp": (150, 160 + 2, 1, 0, 0), "out": (150, 160 + 1, 2, 0, 0)})
    seeds["rms_add_negative"] = seed("rms_add", F16, size=("small", 2, 3, 9),
                                     bufs={"res": (150, 160 + 5, 2, 0, 0), "h": (150, 160 + 6, 10, 0, 0)})
    seeds["ln_bwd_broadcast"] = seed("ln_bwd", F32, size=("small", 2, 3, 8),
                                     bufs={"dout": (150, 160 + 4, 11, 0, 0)})
    # in place: out over inp with the same strides (alias target inp = 0, bit 7 set)
    seeds["ln_fwd_inplace"] = seed("ln_fwd", F32, size=("small", 2, 2, 6),
                                   bufs={"out": (220, 0, 0, 0x80 | 0, 0)})
    seeds["rms_add_h_inplace"] = seed("rms_add", BF16, size=("small", 1, 3, 10),
                                      bufs={"h": (220, 0, 0, 0x80 | 1, 0)})
    seeds["ln_bwd_dinp_inplace_acc"] = seed("ln_bwd", F64, size=("small", 2, 2, 7), flags=200,
                                            bufs={"dinp": (220, 0, 0, 0x80 | 4, 0)})
    # aliases one element off (must be refused)
    seeds["ln_fwd_alias_off1"] = seed("ln_fwd", F32, size=("small", 1, 2, 5),
                                      bufs={"out": (220, 0, 0, 0, 2)})
    seeds["ln_bwd_dw_alias_w"] = seed("ln_bwd", F32, size=("small", 1, 2, 5),
                                      bufs={"dw": (220, 0, 0, 2, 0)})
    # the contract's faults
    seeds["null_inp"] = seed("rms_fwd", F32, bufs={"inp": (0, 0, 0, 0, 0)})
    seeds["bad_dtype"] = seed("ln_fwd", 245)
    seeds["bad_wdtype"] = seed("ln_add", F16, wdt=203)   # 203 % 4: f64 weights for f16 data
    seeds["eps_nan"] = seed("ln_fwd", F32, eps=160 + 11)
    seeds["eps_huge"] = seed("rms_fwd", F32, eps=160 + 7)
    seeds["bad_flags"] = seed("rms_bwd", F32, flags=241)
    seeds["short_scratch"] = seed("ln_bwd", F32, scratch=5)
    seeds["scratch_size_max"] = seed("ln_bwd", F32, scratch=7)
    seeds["sizes_hostile"] = seed("ln_fwd", F32, size=("hostile", 0x80 | 7, 0x80 | 6, 2))
    seeds["sizes_2p31"] = seed("rms_bwd", BF16, size=("hostile", 0x80 | 8, 1, 1),
                               bufs={"dout": (0, 0, 0, 0, 0)})
    # strides whose extent overflows int64: {2^62, 2^62} on out, B = T = 2
    seeds["extent_overflow_out"] = seed("ln_fwd", F32, size=("small", 2, 2, 4),
                                        bufs={"out": (150, 160 + 13, 9, 0, 0)})
    seeds["stride_int64_min"] = seed("rms_fwd", F32, size=("small", 1, 3, 4),
                                     bufs={"out": (150, 160 + 0, 8, 0, 0)})
    # found by the fuzzer: LayerNorm backward, C = 1, a subnormal dout row
    # times w (g = dy * w loses relative precision) that rstd * x-hat^2 then
    # scales up by 2.5e7; the harness's allowance for subnormal g must grow
    # with it
    seeds["ln_bwd_subnormal_g"] = bytes.fromhex(
        "a428010202240100000002c8b600000000960000000096000000009600005b00960000000096000000009600000100006a"
        "0000009600000096a1000000009600000000960000000000009600db010000000000000000000002")
    for name, data in seeds.items():
        with open(os.path.join(corpus, name), "wb") as f:
            f.write(data)
    print(f"{len(seeds)} seeds in {corpus}")
    corpus = os.path.join(here, "corpus_spatial")
    os.makedirs(corpus, exist_ok=True)
    for f in os.listdir(corpus):
        os.remove(os.path.join(corpus, f))
    seeds = spatial_seeds()
    for name, data in seeds.items():
        with open(os.path.join(corpus, name), "wb") as f:
            f.write(data)
    print(f"{len(seeds)} seeds in {corpus}")


if __name__ == "__main__":
    main()
