/* Wakeup latency between two threads, across CPUs and on one: what every
 * FUSE request pays twice (bench/mount.sh prints it with the machine).
 * Usage: wakeup            prints "ACROSS ONE" in microseconds per round trip. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

enum { ROUNDS = 20000 };
static int ping[2], pong[2];

static void pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  sched_setaffinity(0, sizeof set, &set);
}

static void *echo(void *cpu) {
  char c;
  pin((int)(long)cpu);
  for (int i = 0; i < ROUNDS; i++)
    if (read(ping[0], &c, 1) != 1 || write(pong[1], &c, 1) != 1) break;
  return NULL;
}

/* Microseconds per round trip with the echoing thread on `cpu`, the caller on CPU 0. */
static double round_trip(int cpu) {
  pthread_t t;
  struct timespec a, b;
  char c = 0;
  if (pipe(ping) || pipe(pong)) return -1;
  pin(0);
  pthread_create(&t, NULL, echo, (void *)(long)cpu);
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (int i = 0; i < ROUNDS; i++)
    if (write(ping[1], &c, 1) != 1 || read(pong[0], &c, 1) != 1) return -1;
  clock_gettime(CLOCK_MONOTONIC, &b);
  pthread_join(t, NULL);
  close(ping[0]); close(ping[1]); close(pong[0]); close(pong[1]);
  return ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / ROUNDS / 1000.0;
}

int main(void) {
  double across = sysconf(_SC_NPROCESSORS_ONLN) > 1 ? round_trip(1) : 0;
  printf("%.1f %.1f\n", across, round_trip(0));
  return 0;
}
