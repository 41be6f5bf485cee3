// floor(sqrt(n)) for an unsigned 2*ROOT_W-bit n, exactly, by the digit-by-digit (restoring) method:
// two bits of n per cycle, one bit of the root, ROOT_W + 2 cycles from `start` to `done`.
// (docs/integer_only.md allows any exact isqrt; this one needs no divider.)
//   rem <- (rem << 2) | next two bits of n;  trial = (root << 2) | 1
//   rem >= trial: rem -= trial, root = (root << 1) | 1;  else root = root << 1
module tqt_isqrt #(
    parameter int ROOT_W = 24
) (
    input  logic                  clk,
    input  logic                  rst,
    input  logic                  start,
    input  logic [2*ROOT_W-1:0]   n,
    output logic                  done,
    output logic [ROOT_W-1:0]     root
);
  logic [2*ROOT_W-1:0] rest;  // n's bits not yet brought down, top first
  logic [ROOT_W-1:0] remainder;  // < 2^ROOT_W whenever another step reads it
  logic [ROOT_W+1:0] brought, trial;
  logic [ROOT_W-1:0] partial;
  logic busy;
  logic [$clog2(ROOT_W + 1)-1:0] step;

  assign brought = {remainder, rest[2*ROOT_W-1 -: 2]};
  assign trial = {partial, 2'b01};

  always_ff @(posedge clk) begin
    done <= 0;
    if (rst) begin
      busy <= 0;
    end else if (start) begin
      rest <= n;
      remainder <= '0;
      partial <= '0;
      step <= ROOT_W[$clog2(ROOT_W + 1)-1:0];
      busy <= 1;
    end else if (busy && step != 0) begin
      rest <= rest << 2;
      if (brought >= trial) begin
        remainder <= brought - trial;
        partial <= {partial[ROOT_W-2:0], 1'b1};
      end else begin
        remainder <= brought;
        partial <= {partial[ROOT_W-2:0], 1'b0};
      end
      step <= step - 1;
    end else if (busy) begin
      root <= partial;
      done <= 1;
      busy <= 0;
    end
  end
endmodule
