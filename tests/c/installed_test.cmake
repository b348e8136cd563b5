# installed_test.cmake - installs the pynorm build tree into a fresh prefix,
# then builds and runs a client against that prefix only, one of four ways:
#
#   PN_MODE=find_package   tests/c/consumer (find_package(pynorm), pynorm::pynorm
#                          and pynorm::pynorm_static) configured, built, both run
#   PN_MODE=pkgconfig      tests/c/consumer/pkgconfig_client.c compiled with
#                          nothing but  cc client.c $(pkg-config --cflags --libs pynorm),
#                          run; then linked statically (Libs.private), run
#   PN_MODE=example_cmake  examples/ configured with find_package(pynorm), built, run
#   PN_MODE=example_make   examples/Makefile (pkg-config) run in a copy of the
#                          example, the program run
#
# The pkg-config modes print "PYNORM_TEST_SKIPPED: ..." and stop (ctest's
# SKIP_REGULAR_EXPRESSION) where pkg-config (or make) is not installed. Run
# with cmake -P:
#
#   cmake -DPN_MODE=<mode> -DPN_BUILD_DIR=<pynorm build dir> -DPN_SOURCE_DIR=<pynorm source>
#         -DPN_WORK_DIR=<scratch dir> [-DPN_CONFIG=Release] [-DPN_GENERATOR=...]
#         [-DPN_C_COMPILER=cc] [-DPN_C_FLAGS=...] [-DPN_LINKER_FLAGS=...]
#         -P installed_test.cmake
cmake_minimum_required(VERSION 3.18)

foreach(var PN_MODE PN_BUILD_DIR PN_SOURCE_DIR PN_WORK_DIR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "installed_test.cmake: -D${var}=... is required")
  endif()
endforeach()
if(NOT PN_MODE MATCHES "^(find_package|pkgconfig|example_cmake|example_make)$")
  message(FATAL_ERROR "installed_test.cmake: unknown PN_MODE=${PN_MODE}")
endif()
if(NOT DEFINED PN_CONFIG OR "${PN_CONFIG}" STREQUAL "")
  set(PN_CONFIG Release)
endif()
if(NOT DEFINED PN_C_COMPILER OR "${PN_C_COMPILER}" STREQUAL "")
  set(PN_C_COMPILER cc)
endif()
foreach(var PN_C_FLAGS PN_LINKER_FLAGS)
  if(NOT DEFINED ${var})
    set(${var} "")
  endif()
endforeach()

function(run_step name)
  execute_process(COMMAND ${ARGN}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  message(STATUS "[${name}] ${out}${err}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${PN_MODE} test: step '${name}' failed (exit ${rc})")
  endif()
endfunction()

# the tools first: a missing one skips the test before anything is done
if(PN_MODE MATCHES "pkgconfig|example_make")
  find_program(PKG_CONFIG NAMES pkg-config pkgconf)
  if(NOT PKG_CONFIG)
    message(STATUS "PYNORM_TEST_SKIPPED: pkg-config is not installed (apt-get install pkg-config)")
    return()
  endif()
endif()
if(PN_MODE STREQUAL "example_make")
  find_program(MAKE NAMES gmake make)
  if(NOT MAKE)
    message(STATUS "PYNORM_TEST_SKIPPED: make is not installed")
    return()
  endif()
endif()

# 1. install into a fresh prefix
set(prefix "${PN_WORK_DIR}/prefix")
file(REMOVE_RECURSE "${PN_WORK_DIR}")
file(MAKE_DIRECTORY "${PN_WORK_DIR}")
run_step(install "${CMAKE_COMMAND}" --install "${PN_BUILD_DIR}" --prefix "${prefix}"
         --config "${PN_CONFIG}")
get_filename_component(prefix_real "${prefix}" REALPATH)
if(NOT EXISTS "${prefix}/include/pynorm.h")
  message(FATAL_ERROR "${PN_MODE} test: ${prefix}/include/pynorm.h was not installed")
endif()
file(GLOB_RECURSE configs "${prefix}/*/pynormConfig.cmake" "${prefix}/*/pynorm-config.cmake")
if(NOT configs)
  message(FATAL_ERROR "${PN_MODE} test: no pynormConfig.cmake under ${prefix}")
endif()

# the pkg-config file, and what it says
if(PN_MODE MATCHES "pkgconfig|example_make")
  file(GLOB_RECURSE pcs "${prefix}/*/pkgconfig/pynorm.pc")
  list(LENGTH pcs npc)
  if(NOT npc EQUAL 1)
    message(FATAL_ERROR "${PN_MODE} test: want one pkgconfig/pynorm.pc under ${prefix}, found: ${pcs}")
  endif()
  get_filename_component(pcdir "${pcs}" DIRECTORY)
  set(pcenv "PKG_CONFIG_PATH=${pcdir}")
  function(pkg_config var)
    execute_process(COMMAND "${CMAKE_COMMAND}" -E env "${pcenv}" "${PKG_CONFIG}" ${ARGN} pynorm
                    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err
                    OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(NOT rc EQUAL 0)
      message(FATAL_ERROR "${PN_MODE} test: pkg-config ${ARGN} pynorm failed: ${err}")
    endif()
    set(${var} "${out}" PARENT_SCOPE)
  endfunction()
  pkg_config(pc_prefix --variable=prefix)
  pkg_config(pc_libdir --variable=libdir)
  pkg_config(pc_flags --cflags --libs)
  pkg_config(pc_static --static --libs)
  message(STATUS "${pcs}: prefix=${pc_prefix} libdir=${pc_libdir}\n"
                 "  --cflags --libs: ${pc_flags}\n  --static --libs: ${pc_static}")
  get_filename_component(pc_prefix_real "${pc_prefix}" REALPATH)
  if(NOT pc_prefix_real STREQUAL prefix_real)
    message(FATAL_ERROR "${PN_MODE} test: pynorm.pc says prefix=${pc_prefix}, installed to ${prefix}")
  endif()
  foreach(f "${pc_libdir}/libpynorm.so" "${pc_libdir}/libpynorm.a")
    if(NOT EXISTS "${f}")
      message(FATAL_ERROR "${PN_MODE} test: pynorm.pc's libdir has no ${f}")
    endif()
  endforeach()
  set(libpath "${pc_libdir}")
else()
  set(libpath "${prefix}/lib")
  if(EXISTS "${prefix}/lib64")
    string(APPEND libpath ":${prefix}/lib64")
  endif()
endif()
if(DEFINED ENV{LD_LIBRARY_PATH} AND NOT "$ENV{LD_LIBRARY_PATH}" STREQUAL "")
  string(APPEND libpath ":$ENV{LD_LIBRARY_PATH}")
endif()

# whether a program loads libpynorm, and from where (ldd; Linux only)
find_program(LDD ldd)
function(check_linked app want)   # want: "prefix" or "none"
  if(NOT LDD OR NOT CMAKE_HOST_UNIX OR APPLE)
    return()
  endif()
  execute_process(COMMAND "${CMAKE_COMMAND}" -E env "LD_LIBRARY_PATH=${libpath}" "${LDD}" "${app}"
                  OUTPUT_VARIABLE ldd_out)
  string(REGEX MATCH "libpynorm[^ ]* => [^ ]+" ldd_line "${ldd_out}")
  if(want STREQUAL "none")
    if(ldd_out MATCHES "libpynorm")
      message(FATAL_ERROR "${PN_MODE} test: the static link of ${app} still loads ${ldd_line}")
    endif()
    message(STATUS "ldd ${app}: no libpynorm (linked statically)")
  else()
    if(NOT ldd_line MATCHES "${prefix_real}|${prefix}")
      message(FATAL_ERROR "${PN_MODE} test: ${app} resolved '${ldd_line}', not the installed library")
    endif()
    message(STATUS "ldd ${app}: ${ldd_line}")
  endif()
endfunction()

if(PN_MODE STREQUAL "pkgconfig")
  # 2. the shared library: the one-liner, verbatim, run by the shell
  set(src "${PN_SOURCE_DIR}/tests/c/consumer/pkgconfig_client.c")
  set(env "${pcenv}" "PN_CC=${PN_C_COMPILER}" "PN_FLAGS=${PN_C_FLAGS} ${PN_LINKER_FLAGS}"
          "PN_SRC=${src}" "PKG_CONFIG=${PKG_CONFIG}")
  run_step(build_shared "${CMAKE_COMMAND}" -E env ${env} "PN_OUT=${PN_WORK_DIR}/client" sh -c
           [[set -x
"$PN_CC" $PN_FLAGS "$PN_SRC" -o "$PN_OUT" $("$PKG_CONFIG" --cflags --libs pynorm)]])
  run_step(run_shared "${CMAKE_COMMAND}" -E env "LD_LIBRARY_PATH=${libpath}" "${PN_WORK_DIR}/client")
  check_linked("${PN_WORK_DIR}/client" prefix)
  # 3. the static library: --static adds Libs.private; -l:libpynorm.a picks
  #    the archive where the shared library is installed beside it
  run_step(build_static "${CMAKE_COMMAND}" -E env ${env} "PN_OUT=${PN_WORK_DIR}/client_static" sh -c
           [[set -x
"$PN_CC" $PN_FLAGS "$PN_SRC" -o "$PN_OUT" $("$PKG_CONFIG" --cflags pynorm) $("$PKG_CONFIG" --static --libs pynorm | sed 's/-lpynorm/-l:libpynorm.a/')]])
  run_step(run_static "${PN_WORK_DIR}/client_static")
  check_linked("${PN_WORK_DIR}/client_static" none)
elseif(PN_MODE MATCHES "find_package|example_cmake")
  # 2. a CMake project of its own, against the prefix only (no package
  #    registry, no build tree): configure, check that the package came from
  #    the prefix, build, run each program
  if(PN_MODE STREQUAL "find_package")
    set(src "${PN_SOURCE_DIR}/tests/c/consumer")
    set(apps app app_static)           # app_static: where the package has pynorm::pynorm_static
  else()
    set(src "${PN_SOURCE_DIR}/examples")
    set(apps block_norms)
  endif()
  set(build "${PN_WORK_DIR}/build")
  set(cfg_args -S "${src}" -B "${build}"
      "-DCMAKE_PREFIX_PATH=${prefix}" "-DCMAKE_BUILD_TYPE=${PN_CONFIG}"
      -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF "-DCMAKE_C_COMPILER=${PN_C_COMPILER}")
  if(DEFINED PN_GENERATOR AND NOT "${PN_GENERATOR}" STREQUAL "")
    list(APPEND cfg_args -G "${PN_GENERATOR}")
  endif()
  if(NOT "${PN_C_FLAGS}" STREQUAL "")
    list(APPEND cfg_args "-DCMAKE_C_FLAGS=${PN_C_FLAGS}")
  endif()
  if(NOT "${PN_LINKER_FLAGS}" STREQUAL "")
    list(APPEND cfg_args "-DCMAKE_EXE_LINKER_FLAGS=${PN_LINKER_FLAGS}")
  endif()
  run_step(configure "${CMAKE_COMMAND}" ${cfg_args})
  file(STRINGS "${build}/CMakeCache.txt" dirline REGEX "^pynorm_DIR:")
  string(REGEX REPLACE "^pynorm_DIR:[A-Z]*=" "" pynorm_dir "${dirline}")
  get_filename_component(pynorm_dir "${pynorm_dir}" REALPATH)
  string(FIND "${pynorm_dir}" "${prefix_real}/" at)
  if(NOT at EQUAL 0)
    message(FATAL_ERROR "${PN_MODE} test: pynorm_DIR=${pynorm_dir} is not under ${prefix_real}")
  endif()
  run_step(build "${CMAKE_COMMAND}" --build "${build}" --config "${PN_CONFIG}")
  foreach(name ${apps})
    set(app "${build}/${name}")
    if(NOT EXISTS "${app}" AND EXISTS "${build}/${PN_CONFIG}/${name}")
      set(app "${build}/${PN_CONFIG}/${name}")
    endif()
    if(name STREQUAL "app_static" AND NOT EXISTS "${app}")
      message(STATUS "no app_static (the package has no pynorm::pynorm_static)")
      continue()
    endif()
    run_step(run_${name} "${CMAKE_COMMAND}" -E env "LD_LIBRARY_PATH=${libpath}" "${app}")
    if(name STREQUAL "app_static")
      check_linked("${app}" none)
    else()
      check_linked("${app}" prefix)
    endif()
  endforeach()
else()
  # 2. examples/Makefile in a copy of the example (make builds in place)
  set(dir "${PN_WORK_DIR}/make")
  file(COPY "${PN_SOURCE_DIR}/examples/block_norms.c" "${PN_SOURCE_DIR}/examples/Makefile"
       DESTINATION "${dir}")
  run_step(make "${CMAKE_COMMAND}" -E env "${pcenv}" "${MAKE}" -C "${dir}"
           "CC=${PN_C_COMPILER}" "CFLAGS=-O2 ${PN_C_FLAGS}" "LDFLAGS=${PN_LINKER_FLAGS}"
           "PKG_CONFIG=${PKG_CONFIG}")
  run_step(run "${CMAKE_COMMAND}" -E env "LD_LIBRARY_PATH=${libpath}" "${dir}/block_norms")
  check_linked("${dir}/block_norms" prefix)
endif()
message(STATUS "${PN_MODE} test passed")
