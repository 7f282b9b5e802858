# cmake -DSOURCE=<kernel source> -DOUT=<file> -P source_hash.cmake
# Writes the SHA-256 of the kernel source: the stamp a fatbin carries beside it
# (<fatbin>.sha256), so that kvwire refuses a fatbin built from another version of the
# source (kvwire/cuda/kernels.py, prebuilt_fatbin) and compiles the source with NVRTC.
file(SHA256 "${SOURCE}" hash)
file(WRITE "${OUT}" "${hash}\n")
