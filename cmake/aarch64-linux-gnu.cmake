# CMake toolchain for aarch64 Linux with the GNU cross compiler of Debian/Ubuntu
# (g++-aarch64-linux-gnu), used by tools/cross-aarch64 for tests/cpp. Programs built with it run
# under qemu-user through CMAKE_CROSSCOMPILING_EMULATOR, so `ctest` works on an x86-64 host.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)  # cmake/core.cmake picks the NEON unit from this

set(STOCHDEPTH_AARCH64_TRIPLE "aarch64-linux-gnu" CACHE STRING "Cross toolchain prefix")
set(STOCHDEPTH_AARCH64_SYSROOT "/usr/${STOCHDEPTH_AARCH64_TRIPLE}" CACHE PATH
    "The target's libraries (libc, libstdc++), for the linker and for qemu -L")

set(CMAKE_C_COMPILER ${STOCHDEPTH_AARCH64_TRIPLE}-gcc)
set(CMAKE_CXX_COMPILER ${STOCHDEPTH_AARCH64_TRIPLE}-g++)

# Libraries and headers from the target tree only; programs (qemu, cmake's helpers) from the host.
set(CMAKE_FIND_ROOT_PATH ${STOCHDEPTH_AARCH64_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

if(NOT CMAKE_CROSSCOMPILING_EMULATOR)
  find_program(STOCHDEPTH_QEMU_AARCH64 qemu-aarch64)
  if(STOCHDEPTH_QEMU_AARCH64)
    set(CMAKE_CROSSCOMPILING_EMULATOR ${STOCHDEPTH_QEMU_AARCH64} -L ${STOCHDEPTH_AARCH64_SYSROOT})
  endif()
endif()
