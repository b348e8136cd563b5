# Cross build for 64-bit ARM Linux with Debian/Ubuntu's cross GCC; the tests
# run under qemu-user (ctest prefixes each test command with the emulator).
#
#   apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross libgomp1-arm64-cross qemu-user
#   cmake -S . -B build/aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/toolchains/aarch64-linux-gnu.cmake \
#         -DBUILD_TESTING=ON
#   cmake --build build/aarch64 -j
#   ctest --test-dir build/aarch64 -L cpu
#
# PN_AARCH64_SYSROOT names the target's libraries (the loader, libc, libgomp)
# for qemu; PN_AARCH64_PREFIX picks another cross compiler triplet.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

if(NOT DEFINED PN_AARCH64_PREFIX)
  set(PN_AARCH64_PREFIX aarch64-linux-gnu)
endif()
if(NOT DEFINED PN_AARCH64_SYSROOT)
  set(PN_AARCH64_SYSROOT /usr/${PN_AARCH64_PREFIX})
endif()
set(CMAKE_C_COMPILER ${PN_AARCH64_PREFIX}-gcc)
# try_compile() runs in projects of its own: hand the two settings on
set(CMAKE_TRY_COMPILE_PLATFORM_VARIABLES PN_AARCH64_PREFIX PN_AARCH64_SYSROOT)

# the target's libraries, headers and packages come from the cross prefix
# only; programs (cmake, pkg-config) from the host
set(CMAKE_FIND_ROOT_PATH ${PN_AARCH64_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L ${PN_AARCH64_SYSROOT})
