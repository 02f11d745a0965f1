#pragma once

// A real redis-server for tests: a child process on a free loopback port, in a temp dir, without
// persistence; killed on destruction.

#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "lib/state/redis_connection.h"
#include "tests/unit/test_util.h"

extern char** environ;

namespace tokenbroker::testing {

inline int FreePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

// A redis-server child process on a free loopback port, in a temp dir, without persistence.
class RedisProcess {
 public:
  explicit RedisProcess(std::vector<std::string> extra = {}) : port_(FreePort()), extra_(std::move(extra)) { Start(); }
  ~RedisProcess() { Kill(); }

  void Start() {
    std::vector<std::string> args = {"redis-server", "--port", std::to_string(port_), "--bind", "127.0.0.1",
                                     "--dir", dir_.path(), "--save", "", "--appendonly", "no",
                                     "--protected-mode", "no", "--loglevel", "warning",
                                     "--logfile", dir_.Join("redis.log")};
    args.insert(args.end(), extra_.begin(), extra_.end());
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ASSERT_EQ(posix_spawnp(&pid_, "redis-server", nullptr, nullptr, argv.data(), environ), 0);
    ASSERT_TRUE(Eventually([&] {
      auto c = RedisConnection::Connect(address(), absl::Milliseconds(200));
      return c.ok() && (*c)->Command({"PING"}).status().code() != absl::StatusCode::kUnavailable;
    }));
  }
  void Kill() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = 0;
  }
  void Pause() { ::kill(pid_, SIGSTOP); }   // hangs: connections stay open, nothing answers
  void Resume() { ::kill(pid_, SIGCONT); }
  RedisAddress address() const { return RedisAddress{"127.0.0.1", port_, 0}; }
  std::unique_ptr<RedisConnection> Connect() const {
    auto c = RedisConnection::Connect(address(), absl::Seconds(1));
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? *std::move(c) : nullptr;
  }

 private:
  TempDir dir_;
  int port_;
  std::vector<std::string> extra_;
  pid_t pid_ = 0;
};

}  // namespace tokenbroker::testing
