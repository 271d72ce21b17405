// Runs one launch of one of rankstack's CUDA kernels (cuda/*.cu) on the CPU, for the tests of
// crates/kernels/src/cuda_on_host.rs.
//
//   runner --list
//   runner KERNEL GRID_X GRID_Y GRID_Z BLOCK_X BLOCK_Y BLOCK_Z ARG...
//
// An ARG is a buffer, `f32s=PATH`, `f64s=PATH` or `u32s=PATH` (the file's raw little-endian
// elements, read before the launch and written back after it), or a scalar, `f32=BITS` (the
// float's bits in hex), `u32=N` or `u64=N`. Each argument's kind must be the type of the kernel's
// parameter at its position, and their number the kernel's: a launch that does not match the
// kernel's signature is refused before it runs (exit status 2, the reason on stderr).
//
// Each buffer lies between two inaccessible pages, its last element against the second: a kernel
// that reads or writes past either end of a buffer dies of SIGSEGV instead of reading garbage.

#include "cuda_on_host.h"

#include "../adamw.cu"
#include "../bias_add.cu"
#include "../embedding_bag.cu"
#include "../layer_norm.cu"
#include "../overwrite_rows.cu"
#include "../packed_attention.cu"
#include "../segment_sum.cu"
#include "../sum_of_squares.cu"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

[[noreturn]] void refuse(const std::string& why) {
    std::fprintf(stderr, "%s\n", why.c_str());
    std::exit(2);
}

enum class Kind { F32s, F64s, U32s, F32, U32, U64 };

const char* kind_name(Kind k) {
    switch (k) {
        case Kind::F32s: return "f32s";
        case Kind::F64s: return "f64s";
        case Kind::U32s: return "u32s";
        case Kind::F32: return "f32";
        case Kind::U32: return "u32";
        case Kind::U64: return "u64";
    }
    return "?";
}

// A buffer between two PROT_NONE pages, its end against the second.
struct Guarded {
    char* base = nullptr;
    size_t mapped = 0;
    char* data = nullptr;
    size_t bytes = 0;
};

Guarded guarded(size_t bytes) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t pages = (bytes + page - 1) / page;
    Guarded g;
    g.mapped = (pages + 2) * page;
    void* base = mmap(nullptr, g.mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) refuse("cannot map a buffer of " + std::to_string(bytes) + " bytes");
    g.base = static_cast<char*>(base);
    if (mprotect(g.base, page, PROT_NONE) != 0 || mprotect(g.base + (pages + 1) * page, page, PROT_NONE) != 0) {
        refuse("cannot protect a buffer's guard pages");
    }
    g.bytes = bytes;
    g.data = g.base + (pages + 1) * page - bytes;
    return g;
}

struct Arg {
    Kind kind;
    std::string path;  // buffers
    Guarded buffer;    // buffers
    uint64_t bits = 0; // scalars
};

size_t element_size(Kind k) { return k == Kind::F64s ? 8 : 4; }

Arg parse_arg(const std::string& text) {
    const size_t eq = text.find('=');
    if (eq == std::string::npos) refuse("argument without a kind: " + text);
    const std::string kind = text.substr(0, eq), value = text.substr(eq + 1);
    Arg a;
    if (kind == "f32s" || kind == "f64s" || kind == "u32s") {
        a.kind = kind == "f32s" ? Kind::F32s : kind == "f64s" ? Kind::F64s : Kind::U32s;
        a.path = value;
        FILE* f = std::fopen(value.c_str(), "rb");
        if (!f) refuse("cannot read " + value);
        std::fseek(f, 0, SEEK_END);
        const size_t bytes = (size_t)std::ftell(f);
        std::fseek(f, 0, SEEK_SET);
        if (bytes % element_size(a.kind) != 0) refuse(value + ": not a whole number of elements");
        a.buffer = guarded(bytes);
        if (bytes > 0 && std::fread(a.buffer.data, 1, bytes, f) != bytes) refuse("short read of " + value);
        std::fclose(f);
    } else if (kind == "f32") {
        a.kind = Kind::F32;
        a.bits = std::stoull(value, nullptr, 16);
    } else if (kind == "u32" || kind == "u64") {
        a.kind = kind == "u32" ? Kind::U32 : Kind::U64;
        a.bits = std::stoull(value, nullptr, 10);
        if (a.kind == Kind::U32 && a.bits > UINT32_MAX) refuse("u32 out of range: " + value);
    } else {
        refuse("unknown argument kind: " + kind);
    }
    return a;
}

template <class E> constexpr Kind buffer_kind() {
    static_assert(std::is_same_v<E, float> || std::is_same_v<E, double> || std::is_same_v<E, unsigned int>);
    if constexpr (std::is_same_v<E, float>) return Kind::F32s;
    else if constexpr (std::is_same_v<E, double>) return Kind::F64s;
    else return Kind::U32s;
}

template <class S> constexpr Kind scalar_kind() {
    static_assert(std::is_same_v<S, float> || std::is_same_v<S, unsigned int> || std::is_same_v<S, unsigned long long>);
    if constexpr (std::is_same_v<S, float>) return Kind::F32;
    else if constexpr (std::is_same_v<S, unsigned int>) return Kind::U32;
    else return Kind::U64;
}

// Argument `i` as the kernel's parameter type P, or a refusal naming both kinds.
template <class P> P convert(Arg& a, size_t i, const std::string& kernel) {
    constexpr Kind want = [] {
        if constexpr (std::is_pointer_v<P>) return buffer_kind<std::remove_cv_t<std::remove_pointer_t<P>>>();
        else return scalar_kind<P>();
    }();
    if (a.kind != want) {
        refuse(kernel + ": argument " + std::to_string(i) + " is " + kind_name(a.kind) + ", the kernel takes " +
               kind_name(want));
    }
    if constexpr (std::is_pointer_v<P>) {
        return reinterpret_cast<P>(a.buffer.data);
    } else {
        P v;
        std::memcpy(&v, &a.bits, sizeof(P));
        return v;
    }
}

template <class... P, size_t... I>
std::function<void()> bind_launch(void (*kernel)(P...), std::vector<Arg>& args, const std::string& name,
                           std::index_sequence<I...>) {
    if (args.size() != sizeof...(P)) {
        refuse(name + " takes " + std::to_string(sizeof...(P)) + " arguments, got " + std::to_string(args.size()));
    }
    std::tuple<P...> values{convert<P>(args[I], I, name)...};
    return [kernel, values] { std::apply(kernel, values); };
}

template <class... P> std::function<void()> bind_launch(void (*kernel)(P...), std::vector<Arg>& args, const std::string& name) {
    return bind_launch(kernel, args, name, std::index_sequence_for<P...>{});
}

using Binder = std::function<std::function<void()>(std::vector<Arg>&)>;

#define KERNEL(name) {#name, [](std::vector<Arg>& args) { return bind_launch(name, args, #name); }}

const std::map<std::string, Binder> KERNELS = {
    KERNEL(segment_sum_rows_f32),
    KERNEL(embedding_bag_f32),
    KERNEL(layer_norm_f32),
    KERNEL(residual_layer_norm_f32),
    KERNEL(overwrite_rows_f32),
    KERNEL(overwrite_rows_f64),
    KERNEL(adamw_moments_f32),
    KERNEL(adamw_moments_rows_f32),
    KERNEL(adamw_parameter_f32),
    KERNEL(adamw_parameter_rows_f32),
    KERNEL(bias_add_f32),
    KERNEL(bias_add_f64),
    KERNEL(packed_attention_f32_dh8),
    KERNEL(packed_attention_f32_dh16),
    KERNEL(packed_attention_f32_dh24),
    KERNEL(packed_attention_f32_dh32),
    KERNEL(packed_attention_f32_dh48),
    KERNEL(packed_attention_f32_dh64),
    KERNEL(packed_attention_f32_dh96),
    KERNEL(packed_attention_f32_dh128),
    KERNEL(sum_of_squares_partials_f32),
    KERNEL(sum_of_squares_partials_f64),
};

// The block scheduler: each thread of the running block is a fiber.
enum class State { Runnable, AtBarrier, Done };
constexpr size_t STACK_BYTES = 64 * 1024;

ucontext_t scheduler;
std::vector<ucontext_t> fibers;
std::vector<State> states;
std::vector<std::vector<char>> stacks;
size_t running = 0;
const std::function<void()>* body = nullptr;

void fiber_entry() {
    (*body)();
    states[running] = State::Done;
    // uc_link returns to the scheduler.
}

void run_block(unsigned int threads) {
    if (stacks.size() < threads) stacks.resize(threads, std::vector<char>(STACK_BYTES));
    fibers.assign(threads, ucontext_t{});
    states.assign(threads, State::Runnable);
    for (unsigned int t = 0; t < threads; ++t) {
        getcontext(&fibers[t]);
        fibers[t].uc_stack.ss_sp = stacks[t].data();
        fibers[t].uc_stack.ss_size = STACK_BYTES;
        fibers[t].uc_link = &scheduler;
        makecontext(&fibers[t], fiber_entry, 0);
    }
    for (;;) {
        for (unsigned int t = 0; t < threads; ++t) {
            if (states[t] != State::Runnable) continue;
            running = t;
            threadIdx = {t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
            swapcontext(&scheduler, &fibers[t]);
        }
        size_t done = 0, waiting = 0;
        for (State s : states) {
            done += s == State::Done;
            waiting += s == State::AtBarrier;
        }
        if (done == threads) return;
        if (done > 0) {
            refuse("__syncthreads() reached by " + std::to_string(waiting) + " of a block's " + std::to_string(threads) +
                   " threads while the others had returned (block " + std::to_string(blockIdx.x) + ")");
        }
        for (State& s : states) s = State::Runnable;
    }
}

void write_back(const Arg& a) {
    FILE* f = std::fopen(a.path.c_str(), "wb");
    if (!f) refuse("cannot write " + a.path);
    if (a.buffer.bytes > 0 && std::fwrite(a.buffer.data, 1, a.buffer.bytes, f) != a.buffer.bytes) {
        refuse("short write of " + a.path);
    }
    std::fclose(f);
}

}  // namespace

void cuda_on_host::syncthreads() {
    states[running] = State::AtBarrier;
    swapcontext(&fibers[running], &scheduler);
}

int main(int argc, char** argv) {
    if (argc == 2 && std::string(argv[1]) == "--list") {
        for (const auto& k : KERNELS) std::printf("%s\n", k.first.c_str());
        return 0;
    }
    if (argc < 8) refuse("usage: runner --list | runner KERNEL GRID_X GRID_Y GRID_Z BLOCK_X BLOCK_Y BLOCK_Z ARG...");
    const std::string name = argv[1];
    const auto kernel = KERNELS.find(name);
    if (kernel == KERNELS.end()) refuse("no kernel named " + name);
    unsigned int dims[6];
    for (int i = 0; i < 6; ++i) {
        const unsigned long long d = std::stoull(argv[2 + i]);
        if (d == 0 || d > UINT32_MAX) refuse("a launch dimension must be in 1..2^32");
        dims[i] = (unsigned int)d;
    }
    gridDim = {dims[0], dims[1], dims[2]};
    blockDim = {dims[3], dims[4], dims[5]};
    const unsigned long long threads = (unsigned long long)dims[3] * dims[4] * dims[5];
    if (threads > 1024) refuse("a block has at most 1024 threads, got " + std::to_string(threads));
    std::vector<Arg> args;
    for (int i = 8; i < argc; ++i) args.push_back(parse_arg(argv[i]));
    const std::function<void()> launch = kernel->second(args);
    body = &launch;
    for (unsigned int z = 0; z < gridDim.z; ++z) {
        for (unsigned int y = 0; y < gridDim.y; ++y) {
            for (unsigned int x = 0; x < gridDim.x; ++x) {
                blockIdx = {x, y, z};
                run_block((unsigned int)threads);
            }
        }
    }
    for (const Arg& a : args) {
        if (!a.path.empty()) write_back(a);
    }
    return 0;
}
