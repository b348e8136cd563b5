"""python -m pynorm.torch.build [--force]: builds pynorm.torch's optional C++ extension
into the cache (see pynorm.torch._ext) and says where it is."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pynorm.torch.build", description=__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache has it")
    args = parser.parse_args(argv)
    from . import _ext
    if not _ext.enabled():
        print("pynorm.torch: PYNORM_TORCH_EXT=0: not building the C++ extension", file=sys.stderr)
        return 1
    try:
        path = _ext.build(force=args.force)
        _ext.load(path)
    except Exception as e:
        print(e, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
