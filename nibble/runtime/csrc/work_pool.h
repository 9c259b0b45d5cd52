// A small work-stealing thread pool for the decode step, made for a busy (oversubscribed) CPU.
//
// run(chunks, fn) calls fn(0..chunks-1) across the calling thread and the helpers. Chunks are
// claimed one by one from a shared counter, so the caller never waits for a helper that has not
// started (it simply takes all chunks itself), only for chunks a helper is already running.
// Helpers spin briefly between jobs (jobs come back to back during a token) and then sleep.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#include <sched.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define NB_PAUSE() _mm_pause()
#else
#define NB_PAUSE() ((void)0)
#endif

namespace nibble {

class WorkPool {
public:
    WorkPool() = default;
    WorkPool(const WorkPool&) = delete;
    WorkPool& operator=(const WorkPool&) = delete;
    ~WorkPool() { stop_helpers(); }

    // Use `threads` threads in all (the caller plus threads - 1 helpers).
    void resize(int64_t threads) {
        const size_t helpers = static_cast<size_t>(std::max<int64_t>(threads, 1) - 1);
        if (helpers == helpers_.size()) return;
        stop_helpers();
        stopping_ = false;
        for (size_t i = 0; i < helpers; ++i) helpers_.emplace_back([this] { helper_loop(); });
    }

    template <typename Fn>
    void run(int64_t chunks, Fn&& fn) {
        if (helpers_.empty() || chunks <= 1) {
            for (int64_t i = 0; i < chunks; ++i) fn(i);
            return;
        }
        std::function<void(int64_t)> job(std::ref(fn));
        const uint64_t generation = generation_.load(std::memory_order_relaxed) + 1;
        // Close the claim word first: a helper still looking at the previous job cannot claim
        // anything while the job fields below are rewritten.
        claim_.store(generation << 32 | kClosed, std::memory_order_seq_cst);
        job_ = &job;
        total_.store(chunks, std::memory_order_relaxed);
        done_.store(0, std::memory_order_relaxed);
        claim_.store(generation << 32, std::memory_order_release);
        generation_.store(generation, std::memory_order_seq_cst);
        if (sleeping_.load(std::memory_order_seq_cst) > 0) {
            std::lock_guard<std::mutex> lock(mutex_);
            wake_.notify_all();
        }
        work(generation);
        for (int spins = 0; done_.load(std::memory_order_acquire) < chunks; ++spins) {
            if (spins < 4096) NB_PAUSE(); else sched_yield();  // a helper holding a chunk was preempted
        }
    }

private:
    // Claim and run chunks of job `generation` until none are left (or a newer job started).
    void work(uint64_t generation) {
        uint64_t state = claim_.load(std::memory_order_acquire);
        while ((state >> 32) == generation) {
            const int64_t index = static_cast<int64_t>(state & kClosed);
            if (index >= total_.load(std::memory_order_relaxed)) return;
            if (claim_.compare_exchange_weak(state, state + 1, std::memory_order_acq_rel)) {
                (*job_)(index);
                done_.fetch_add(1, std::memory_order_release);
                state = claim_.load(std::memory_order_acquire);
            }
        }
    }

    void helper_loop() {
        uint64_t seen = generation_.load(std::memory_order_acquire);
        while (true) {
            const uint64_t current = wait_for_job(seen);
            if (stopping_.load(std::memory_order_acquire)) return;
            seen = current;
            work(current);
        }
    }

    // Spin for up to ~200 microseconds for a new job, then sleep until one is published.
    uint64_t wait_for_job(uint64_t seen) {
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
        for (int spins = 0;; ++spins) {
            const uint64_t current = generation_.load(std::memory_order_acquire);
            if (current != seen || stopping_.load(std::memory_order_relaxed)) return current;
            NB_PAUSE();
            if ((spins & 63) == 63 && std::chrono::steady_clock::now() > deadline) break;
        }
        std::unique_lock<std::mutex> lock(mutex_);
        sleeping_.fetch_add(1, std::memory_order_acq_rel);
        wake_.wait(lock, [&] {
            return generation_.load(std::memory_order_acquire) != seen || stopping_.load(std::memory_order_acquire);
        });
        sleeping_.fetch_sub(1, std::memory_order_acq_rel);
        return generation_.load(std::memory_order_acquire);
    }

    void stop_helpers() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stopping_ = true;
            wake_.notify_all();
        }
        for (auto& helper : helpers_) helper.join();
        helpers_.clear();
    }

    std::vector<std::thread> helpers_;
    std::atomic<uint64_t> generation_{0};
    std::atomic<uint64_t> claim_{0};  // generation << 32 | next chunk index
    std::atomic<int64_t> done_{0};
    std::atomic<int> sleeping_{0};
    std::atomic<bool> stopping_{false};
    static constexpr uint64_t kClosed = 0xffffffffu;
    std::function<void(int64_t)>* job_ = nullptr;
    std::atomic<int64_t> total_{0};
    std::mutex mutex_;
    std::condition_variable wake_;
};

}  // namespace nibble
