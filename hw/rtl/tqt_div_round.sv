// R(a / b) for a signed a and b > 0 (docs/integer_only.md, div_round), by restoring long division,
// one quotient bit per cycle. The caller proves |a| < b 2^Q_W, so only Q_W quotient bits are
// computed (the bits above are 0): Q_W + 2 cycles from `start` to `done`, whatever NUM_W is.
//   |a| = t' b + r'  ->  a // b = t, a mod b = r  (t = -t' - 1, r = b - r' for a < 0 and r' > 0)
//   floor: t;  half_up: t + (2r >= b);  half_even: t + (2r > b or (2r = b and t odd))
module tqt_div_round #(
    parameter int NUM_W = 48,  // a: signed
    parameter int DEN_W = 24,  // b: unsigned, > 0
    parameter int Q_W = 16,    // |a| < b 2^Q_W
    parameter int ROUNDING = 2
) (
    input  logic                   clk,
    input  logic                   rst,
    input  logic                   start,
    input  logic signed [NUM_W-1:0] a,
    input  logic [DEN_W-1:0]       b,
    output logic                   done,    // one cycle, with quotient valid from then on
    output logic signed [Q_W+1:0]  quotient
);
  logic [NUM_W-1:0] magnitude, abs_a;
  logic [DEN_W:0] remainder, trial, divisor_wide;
  logic [Q_W-1:0] bits_t;
  logic [DEN_W-1:0] divisor;
  logic negative, busy;
  logic [$clog2(Q_W + 1)-1:0] step;

  assign abs_a = a[NUM_W-1] ? -a : a;
  assign divisor_wide = divisor;  // zero-extended

  // the finished division: floor quotient t and remainder r, then the rounding
  logic signed [Q_W+1:0] magnitude_t, t;
  logic [DEN_W:0] r, twice_r;
  logic borrow, up;
  assign magnitude_t = bits_t;  // zero-extended: bits_t is unsigned
  assign borrow = negative && remainder != 0;  // a < 0 with a remainder: one below -t'
  assign t = borrow ? -magnitude_t - 1 : negative ? -magnitude_t : magnitude_t;
  assign r = borrow ? divisor_wide - remainder : remainder;
  assign twice_r = r << 1;  // r < b < 2^DEN_W: fits DEN_W + 1 bits
  assign up = ROUNDING == 0 ? 1'b0
            : ROUNDING == 1 ? twice_r >= divisor_wide
            : twice_r > divisor_wide || (twice_r == divisor_wide && t[0]);

  assign trial = {remainder[DEN_W-1:0], magnitude[step - 1]};

  always_ff @(posedge clk) begin
    done <= 0;
    if (rst) begin
      busy <= 0;
    end else if (start) begin
      negative <= a[NUM_W-1];
      magnitude <= abs_a;
      remainder <= abs_a >> Q_W;  // < b by the caller's bound: the upper bits are 0
      divisor <= b;
      bits_t <= '0;
      step <= Q_W[$clog2(Q_W + 1)-1:0];
      busy <= 1;
    end else if (busy && step != 0) begin
      if (trial >= divisor_wide) begin
        remainder <= trial - divisor_wide;
        bits_t <= {bits_t[Q_W-2:0], 1'b1};
      end else begin
        remainder <= trial;
        bits_t <= {bits_t[Q_W-2:0], 1'b0};
      end
      step <= step - 1;
    end else if (busy) begin
      quotient <= up ? t + 1 : t;
      done <= 1;
      busy <= 0;
    end
  end
endmodule
